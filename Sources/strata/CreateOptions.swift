import BlockLayer
import Glibc

/// `qemu-img create -o`, read as QEMU's option parser reads it: only the
/// options the format takes, each value checked against its type as the
/// list is read, so a bad list gets qemu-img's first complaint word for
/// word; and the "Formatting" line printed from what was given, in QEMU's
/// order, with its defaults.
struct CreateOptions {
    /// The type of an option's value, as QEMU's option parser knows them.
    enum Kind {
        /// A byte count with qemu-img's suffixes (`64k`, `1.5M`, `0x1000`).
        case size
        /// An unsigned integer as C's `strtoull` reads it (any base).
        case number
        /// on/off in one of qemu's spellings.
        case bool
        case string
    }

    /// One option a format takes; `defaultText` is what the "Formatting"
    /// line shows when the option is not given.
    struct Option {
        let name: String
        let kind: Kind
        var defaultText: String?
    }

    /// A list that does not read: qemu-img's message, and the lines it
    /// adds under it without its prefix.
    struct Failure: Error, Equatable {
        let message: String
        var hint: [String] = []
    }

    /// The options of each format, in the order qemu-img 7.2 prints them.
    static func options(of format: String) -> [Option] {
        switch format {
        case "qcow2":
            return [Option(name: "cluster_size", kind: .size, defaultText: "65536"),
                    Option(name: "extended_l2", kind: .bool, defaultText: "off"),
                    Option(name: "preallocation", kind: .string),
                    Option(name: "compression_type", kind: .string, defaultText: "zlib"),
                    Option(name: "size", kind: .size),
                    Option(name: "compat", kind: .string),
                    Option(name: "backing_file", kind: .string),
                    Option(name: "backing_fmt", kind: .string),
                    Option(name: "data_file", kind: .string),
                    Option(name: "data_file_raw", kind: .bool),
                    Option(name: "lazy_refcounts", kind: .bool, defaultText: "off"),
                    Option(name: "refcount_bits", kind: .number, defaultText: "16")]
        default:
            return [Option(name: "size", kind: .size), Option(name: "preallocation", kind: .string)]
        }
    }

    let options: [Option]
    /// Each given option's text as given (the last one wins); a bare `key`
    /// is `on`, `nokey` `off`.
    private var texts: [String: String] = [:]
    /// Each given size or number, read.
    private var numbers: [String: UInt64] = [:]

    /// Reads `-o` lists, in order, as QEMU does: `key=value` pairs split at
    /// single commas (`,,` is a comma within a value). Each list has passed
    /// `isValidList`, so no part is empty.
    init(format: String, lists: [String]) throws(Failure) {
        options = Self.options(of: format)
        for list in lists {
            for chunk in QemuOptionList.split(list) {
                guard let equals = chunk.firstIndex(of: "=") else {
                    if chunk.hasPrefix("no") {
                        try set(String(chunk.dropFirst(2)), "off")
                    } else {
                        try set(String(chunk), "on")
                    }
                    continue
                }
                try set(String(chunk[..<equals]), String(chunk[chunk.index(after: equals)...]))
            }
        }
    }

    /// Sets an option as the parser does: it must be one of the format's,
    /// and its value must read as its kind.
    mutating func set(_ name: String, _ text: String) throws(Failure) {
        guard let option = options.first(where: { $0.name == name }) else {
            throw Failure(message: "Invalid parameter '\(name)'")
        }
        switch option.kind {
        case .size:
            switch ImageSize.read(text) {
            case .bytes(let bytes): numbers[name] = bytes
            case .outOfRange: throw Failure(message: "Value '\(text)' is out of range for parameter '\(name)'")
            case .invalid:
                throw Failure(message: "Parameter '\(name)' expects a non-negative number below 2^64",
                              hint: ["Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-",
                                     "and exabytes, respectively."])
            }
        case .number:
            numbers[name] = try Self.number(text, name: name)
        case .bool:
            guard Self.bool(text) != nil else { throw Failure(message: "Parameter '\(name)' expects 'on' or 'off'") }
        case .string:
            break
        }
        texts[name] = text
    }

    /// The text given for `name`, if any.
    func text(_ name: String) -> String? { texts[name] }

    /// The size or number given for `name`, if any.
    func number(_ name: String) -> UInt64? { numbers[name] }

    /// The boolean given for `name`; false when not given.
    func flag(_ name: String) -> Bool { texts[name].flatMap(Self.bool) ?? false }

    /// qemu-img's "Formatting" line: every option given or with a default,
    /// in the format's order; sizes and numbers as signed 64-bit integers.
    func formattingLine(filename: String, format: String) -> String {
        var line = "Formatting '\(filename)', fmt=\(format)"
        for option in options {
            if let number = numbers[option.name] {
                line += " \(option.name)=\(Int64(bitPattern: number))"
            } else if let text = texts[option.name] ?? option.defaultText {
                // Commas doubled, as in an option list.
                line += " \(option.name)=" + String(text.flatMap { $0 == "," ? [",", ","] : [$0] })
            }
        }
        return line
    }

    /// What qemu-img checks of each `-o` list as it reads its command line,
    /// before anything else: not empty, no leading comma, and no single
    /// comma at the end (an even number of them is escaped commas).
    static func isValidList(_ list: String) -> Bool {
        guard let first = list.first, first != "," else { return false }
        let trailing = list.reversed().prefix { $0 == "," }.count
        return trailing % 2 == 0
    }

    /// qemu's spellings of a boolean, case and all.
    static func bool(_ text: String) -> Bool? {
        switch text {
        case "on", "true", "yes", "y": return true
        case "off", "false", "no", "n": return false
        default: return nil
        }
    }

    /// An unsigned integer as `strtoull(text, &end, 0)` reads it, which is
    /// how QEMU reads number options: leading blanks, a sign (a minus sign
    /// wraps around), 0x for hexadecimal and 0 for octal.
    static func number(_ text: String, name: String) throws(Failure) -> UInt64 {
        var end: UnsafeMutablePointer<CChar>?
        errno = 0
        let (value, failed, tooLarge): (UInt64, Bool, Bool) = text.withCString { start in
            let value = UInt64(strtoull(start, &end, 0))
            let consumed = end.map { $0 - UnsafeMutablePointer(mutating: start) } ?? 0
            return (value, consumed == 0 || end?.pointee != 0, errno == ERANGE)
        }
        if failed { throw Failure(message: "Parameter '\(name)' expects a number") }
        if tooLarge { throw Failure(message: "Value '\(text)' is too large for parameter '\(name)'") }
        return value
    }
}
