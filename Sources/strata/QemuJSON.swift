/// A JSON value printed byte for byte as qemu-img prints its own: keys in
/// the order qemu-img's dictionaries give them, four-space indents,
/// `"key": value`, non-ASCII escaped. Scripts written against qemu-img's
/// output (grep and sed as well as JSON parsers) then read ours unchanged.
enum QemuJSON {
    case object([(key: String, value: QemuJSON)])
    case array([QemuJSON])
    case string(String)
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)

    /// An object with `members` in qemu-img's order for that kind of
    /// object: qemu-img's dictionaries are hash tables, so its order is
    /// neither insertion nor alphabetical, but fixed for a set of keys.
    /// Keys not in `order` follow, sorted.
    static func object(_ members: [String: QemuJSON], order: [String]) -> QemuJSON {
        let rank = Dictionary(uniqueKeysWithValues: order.enumerated().map { ($1, $0) })
        let sorted = members.sorted { a, b in
            switch (rank[a.key], rank[b.key]) {
            case let (x?, y?): return x < y
            case (_?, nil): return true
            case (nil, _?): return false
            case (nil, nil): return a.key < b.key
            }
        }
        return .object(sorted.map { (key: $0.key, value: $0.value) })
    }

    /// The member `key` of an object.
    subscript(key: String) -> QemuJSON? {
        guard case .object(let members) = self else { return nil }
        return members.first { $0.key == key }?.value
    }

    /// The text qemu-img prints for this value (without the final newline).
    func rendered(level: Int = 0) -> String {
        let indent = String(repeating: "    ", count: level)
        let inner = String(repeating: "    ", count: level + 1)
        switch self {
        case .object(let members):
            guard !members.isEmpty else { return "{\n\(indent)}" }
            let lines = members.map { "\(inner)\(Self.quoted($0.key)): \($0.value.rendered(level: level + 1))" }
            return "{\n" + lines.joined(separator: ",\n") + "\n\(indent)}"
        case .array(let items):
            guard !items.isEmpty else { return "[\n\(indent)]" }
            return "[\n" + items.map { inner + $0.rendered(level: level + 1) }.joined(separator: ",\n") + "\n\(indent)]"
        case .string(let text):
            return Self.quoted(text)
        case .int(let value):
            return String(value)
        case .uint(let value):
            return String(value)
        case .bool(let value):
            return value ? "true" : "false"
        }
    }

    /// qemu-img's human form of a value: `key: value` lines, lists as
    /// `[index]:`, four more spaces per level (its format-specific block).
    func humanLines(level: Int) -> [String] {
        let indent = String(repeating: "    ", count: level)
        func entry(_ label: String, _ value: QemuJSON) -> [String] {
            switch value {
            case .object, .array:
                return ["\(indent)\(label):"] + value.humanLines(level: level + 1)
            default:
                return ["\(indent)\(label): \(value.humanScalar)"]
            }
        }
        switch self {
        case .object(let members):
            return members.flatMap { entry($0.key.replacing("-", with: " "), $0.value) }
        case .array(let items):
            return items.enumerated().flatMap { entry("[\($0.offset)]", $0.element) }
        default:
            return ["\(indent)\(humanScalar)"]
        }
    }

    private var humanScalar: String {
        switch self {
        case .string(let text): return text
        case .int(let value): return String(value)
        case .uint(let value): return String(value)
        case .bool(let value): return value ? "true" : "false"
        case .object, .array: return ""
        }
    }

    /// A string as qemu-img quotes it: `"` and `\` escaped, control
    /// characters and everything past ASCII as `\uXXXX` (UTF-16, upper-case
    /// hex), `/` left alone.
    static func quoted(_ text: String) -> String {
        var out = "\""
        for unit in text.utf16 {
            switch unit {
            case 0x22: out += "\\\""
            case 0x5C: out += "\\\\"
            case 0x08: out += "\\b"
            case 0x0C: out += "\\f"
            case 0x0A: out += "\\n"
            case 0x0D: out += "\\r"
            case 0x09: out += "\\t"
            case 0x20..<0x7F: out.unicodeScalars.append(Unicode.Scalar(UInt8(unit)))
            default:
                let hex = String(unit, radix: 16, uppercase: true)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            }
        }
        return out + "\""
    }
}
