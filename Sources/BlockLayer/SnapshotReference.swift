/// The internal snapshot a user names with `-l`, in qemu-nbd's two
/// spellings: a bare id or name, or QEMU's `snapshot.id=` and
/// `snapshot.name=` options, of which every one given must match.
public enum SnapshotReference: Sendable, Equatable, CustomStringConvertible {
    /// `-l TEXT`: the snapshot whose id is TEXT, else the one named TEXT.
    case idOrName(String)
    /// `-l snapshot.id=ID,snapshot.name=NAME`, either part or both.
    case exact(id: String?, name: String?)

    /// Parses `-l`'s argument: an option list when it starts with
    /// `snapshot.` (as in qemu-nbd; `,,` is a comma inside a value), else
    /// a bare id or name. A part without `=` reads as `key=on`, as QEMU
    /// reads it. Nil for an option list with another key.
    public init?(parsing text: String) {
        guard text.hasPrefix("snapshot.") else {
            self = .idOrName(text)
            return
        }
        var id: String?
        var name: String?
        var parts = QemuOptionList.split(text)
        // A comma at the end adds nothing.
        if parts.count > 1, parts.last == "" { parts.removeLast() }
        for part in parts {
            let equals = part.firstIndex(of: "=")
            let value = equals.map { String(part[part.index(after: $0)...]) } ?? "on"
            switch part[..<(equals ?? part.endIndex)] {
            case "snapshot.id": id = value
            case "snapshot.name": name = value
            default: return nil
            }
        }
        guard id != nil || name != nil else { return nil }
        self = .exact(id: id, name: name)
    }

    /// The snapshot of `items` this names, by their `id` and `name`.
    public func select<Item>(from items: [Item], id: (Item) -> String, name: (Item) -> String) -> Item? {
        switch self {
        case .idOrName(let text):
            return items.first { id($0) == text } ?? items.first { name($0) == text }
        case .exact(let wantedID, let wantedName):
            return items.first { item in
                (wantedID.map { id(item) == $0 } ?? true) && (wantedName.map { name(item) == $0 } ?? true)
            }
        }
    }

    public var description: String {
        switch self {
        case .idOrName(let text): return text
        case .exact(let id, let name):
            return [id.map { "snapshot.id=\($0)" }, name.map { "snapshot.name=\($0)" }].compactMap { $0 }.joined(separator: ",")
        }
    }
}
