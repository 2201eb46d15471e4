import ArgumentParser

/// `strata img`: the image tool next to the server, with qemu-img's
/// option names, output shapes and exit codes.
struct Img: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create and inspect disk images (qemu-img compatible).",
        subcommands: [ImgCreate.self, ImgInfo.self, ImgMap.self, ImgCheck.self]
    )
}

/// The arguments every inspecting `img` command takes.
struct ImageArguments: ParsableArguments {
    @Option(name: .customShort("f"), help: "Image format (probed when omitted).")
    var format: String?

    @Option(help: "Output format: human or json.")
    var output: OutputFormat = .human

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image even if it is in use.")
    var forceShare = false

    @Argument(help: "The image.")
    var filename: String
}

/// qemu-img's `--output` values.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

/// Parses qemu-img sizes: bytes, or a number with k, M, G, T, P or E
/// (powers of 1024), optionally fractional ("1.5G").
enum ImageSize {
    static func parse(_ text: String) -> UInt64? {
        let units: [Character: UInt64] = ["b": 1, "B": 1, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                                          "T": 1 << 40, "P": 1 << 50, "E": 1 << 60]
        var number = Substring(text)
        var multiplier: UInt64 = 1
        if let last = number.last, let unit = units[last] {
            multiplier = unit
            number = number.dropLast()
        }
        if let whole = UInt64(number) {
            let (value, overflow) = whole.multipliedReportingOverflow(by: multiplier)
            return overflow ? nil : value
        }
        guard let fraction = Double(number), fraction >= 0, fraction * Double(multiplier) < 9.2e18 else { return nil }
        return UInt64(fraction * Double(multiplier))
    }

    static let usage = "Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."

    /// qemu-img's human sizes: "64 MiB", "1.26 MiB", "196 KiB".
    static func human(_ bytes: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 { return "\(bytes) B" }
        let text = value >= 100 ? String(format: "%.0f", value) : value >= 10 ? String(format: "%.1f", value) : String(format: "%.2f", value)
        // qemu-img drops trailing zeros: "64 MiB", "1.5 GiB".
        var trimmed = text
        if trimmed.contains(".") {
            while trimmed.hasSuffix("0") { trimmed.removeLast() }
            if trimmed.hasSuffix(".") { trimmed.removeLast() }
        }
        return "\(trimmed) \(units[unit])"
    }
}

import Foundation
