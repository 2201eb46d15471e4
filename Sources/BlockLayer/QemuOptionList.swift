/// QEMU's option lists (`key=value,key=value`), as its option parser
/// splits them: a single comma separates, `,,` stands for a comma inside a
/// value. Used by `-l snapshot.id=…` and `img create -o`.
public enum QemuOptionList {
    /// The parts of `text`, in order; empty parts (a leading or trailing
    /// single comma) are kept for the caller to judge.
    public static func split(_ text: String) -> [String] {
        var parts: [String] = []
        var current = ""
        var characters = text[...]
        while let character = characters.popFirst() {
            if character == "," {
                if characters.first == "," {
                    characters.removeFirst()
                    current.append(",")
                } else {
                    parts.append(current)
                    current = ""
                }
            } else {
                current.append(character)
            }
        }
        parts.append(current)
        return parts
    }
}
