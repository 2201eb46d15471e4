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

/// Parses sizes as qemu-img does: a decimal number with an optional
/// fraction, or a hexadecimal integer (`0x10`), after optional blanks and
/// `+`, then optionally one of b, k, M, G, T, P or E in either case (powers
/// of 1024). A fraction needs a unit ("1.5G", not "1.5"); exponents
/// ("1e3") are not numbers here.
enum ImageSize {
    static func parse(_ text: String) -> UInt64? {
        let units: [Character: UInt64] = ["b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
                                          "t": 1 << 40, "p": 1 << 50, "e": 1 << 60]
        // strtoull's leading blanks and plus sign, which qemu-img accepts.
        var rest = Substring(text).drop { $0 == " " || $0 == "\t" }
        if rest.first == "+" { rest = rest.dropFirst() }
        var whole: UInt64
        var fraction = 0.0
        if rest.lowercased().hasPrefix("0x") {
            let digits = rest.dropFirst(2).prefix { $0.isHexDigit }
            guard !digits.isEmpty, let value = UInt64(digits, radix: 16) else { return nil }
            whole = value
            rest = rest.dropFirst(2 + digits.count)
        } else {
            let digits = rest.prefix { $0.isASCII && $0.isNumber }
            guard !digits.isEmpty, let value = UInt64(digits) else { return nil }
            whole = value
            rest = rest.dropFirst(digits.count)
            if rest.first == "." {
                let decimals = rest.dropFirst().prefix { $0.isASCII && $0.isNumber }
                guard let value = Double("0." + decimals + "0") else { return nil }
                fraction = value
                rest = rest.dropFirst(1 + decimals.count)
            }
        }
        var multiplier: UInt64 = 1
        if let unit = rest.first {
            guard rest.count == 1, let scale = units[Character(unit.lowercased())] else { return nil }
            multiplier = scale
        }
        guard fraction == 0 || multiplier > 1 else { return nil }
        let (scaled, overflow) = whole.multipliedReportingOverflow(by: multiplier)
        let extra = fraction * Double(multiplier)
        guard !overflow, extra < 9.2e18 else { return nil }
        let (total, carried) = scaled.addingReportingOverflow(UInt64(extra))
        return carried ? nil : total
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
        let text = value >= 100 ? String(printf: "%.0f", value) : value >= 10 ? String(printf: "%.1f", value) : String(printf: "%.2f", value)
        // qemu-img drops trailing zeros: "64 MiB", "1.5 GiB".
        var trimmed = text
        if trimmed.contains(".") {
            while trimmed.hasSuffix("0") { trimmed.removeLast() }
            if trimmed.hasSuffix(".") { trimmed.removeLast() }
        }
        return "\(trimmed) \(units[unit])"
    }
}

import FoundationEssentials
import Glibc
