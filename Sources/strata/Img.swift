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
    @Option(name: [.customShort("f"), .customLong("format")], help: "Image format (probed when omitted).")
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
    /// What a size reads as. qemu-img tells a number too big for 64 bits
    /// ("Must be between ...") from text that is no size (its usage
    /// message), and an integer past 2^64 counts as too big only with
    /// nothing after it.
    enum Reading: Equatable {
        case bytes(UInt64)
        case outOfRange
        case invalid
    }

    /// The size in bytes; nil for anything else.
    static func parse(_ text: String) -> UInt64? {
        if case .bytes(let bytes) = read(text) { return bytes }
        return nil
    }

    static func read(_ text: String) -> Reading {
        let units: [Character: UInt64] = ["b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,
                                          "t": 1 << 40, "p": 1 << 50, "e": 1 << 60]
        // strtoull's leading blanks and plus sign, which qemu-img accepts.
        var rest = Substring(text).drop { $0 == " " || $0 == "\t" }
        if rest.first == "+" { rest = rest.dropFirst() }
        var whole: UInt64?
        var fraction = 0.0
        if rest.lowercased().hasPrefix("0x") {
            let digits = rest.dropFirst(2).prefix { $0.isASCII && $0.isHexDigit }
            guard !digits.isEmpty else { return .invalid }
            whole = UInt64(digits, radix: 16)  // nil only past 2^64
            rest = rest.dropFirst(2 + digits.count)
        } else {
            let digits = rest.prefix { $0.isASCII && $0.isNumber }
            guard !digits.isEmpty else { return .invalid }
            whole = UInt64(digits)  // nil only past 2^64
            rest = rest.dropFirst(digits.count)
            if whole != nil, rest.first == "." {
                let decimals = rest.dropFirst().prefix { $0.isASCII && $0.isNumber }
                guard let value = Double("0." + decimals + "0") else { return .invalid }
                fraction = value
                rest = rest.dropFirst(1 + decimals.count)
            }
        }
        guard let whole else { return rest.isEmpty ? .outOfRange : .invalid }
        var multiplier: UInt64 = 1
        if let unit = rest.first {
            guard rest.count == 1, let scale = units[Character(unit.lowercased())] else { return .invalid }
            multiplier = scale
        }
        guard fraction == 0 || multiplier > 1 else { return .invalid }
        let (scaled, overflow) = whole.multipliedReportingOverflow(by: multiplier)
        let extra = fraction * Double(multiplier)
        guard !overflow, extra < 9.2e18 else { return .outOfRange }
        let (total, carried) = scaled.addingReportingOverflow(UInt64(extra))
        return carried ? .outOfRange : .bytes(total)
    }

    /// qemu-img's two error lines for a size it cannot read, `name` being
    /// what it is ("image size", "start offset").
    static func usage(_ name: String) -> [String] {
        ["Invalid \(name) specified. You may use k, M, G, T, P or E suffixes for",
         "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."]
    }

    /// qemu-img's error for a size past 63 bits.
    static func outOfRange(_ name: String) -> String {
        "Invalid \(name) specified. Must be between 0 and \(Int64.max)."
    }

    /// A size argument as qemu-img reads one (its `cvtnum`): the bytes, or
    /// its error and exit.
    static func argument(_ text: String, name: String) -> Int64 {
        switch read(text) {
        case .bytes(let bytes) where bytes <= UInt64(Int64.max): return Int64(bytes)
        case .bytes, .outOfRange: fail(outOfRange(name))
        case .invalid: fail(lines: usage(name))
        }
    }

    /// qemu-img's human sizes: "64 MiB", "1.26 MiB", "0.977 GiB". As in
    /// qemu-img, a unit is left from 1000 of it on, not 1024 (1000 MiB is
    /// "0.977 GiB"), and the number is printf's `%0.3g`, which also gives
    /// its "1e+03 KiB" for 999.5 KiB.
    static func human(_ bytes: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        let value = Double(UInt64(max(bytes, 0)))
        let scaled = value / (1000.0 / 1024.0)  // exact where it decides: 1000 KiB is 2^20
        let unit = scaled >= 1 ? min(Int(scaled.exponent) / 10, units.count - 1) : 0
        let number = String(printf: "%0.3g", value / Double(UInt64(1) << (10 * unit)))
        return "\(number) \(units[unit])"
    }
}

import FoundationEssentials
import Glibc
