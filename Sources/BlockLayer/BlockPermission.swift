/// What a user of a node may do with it, and what it lets others do.
///
/// The bits and their numbering are QEMU's, because image locks put them on
/// disk (byte 100 + bit for a permission held, 200 + bit for one not
/// shared) and QEMU must read Strata's locks the way it reads its own.
public struct BlockPermission: OptionSet, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Reads return what the image holds (nobody below changes it unseen).
    public static let consistentRead = BlockPermission(rawValue: 1 << 0)
    public static let write = BlockPermission(rawValue: 1 << 1)
    /// Writes that leave the guest-visible data as it was (copy-on-read, stream).
    public static let writeUnchanged = BlockPermission(rawValue: 1 << 2)
    public static let resize = BlockPermission(rawValue: 1 << 3)

    public static let all: BlockPermission = [.consistentRead, .write, .writeUnchanged, .resize]

    /// The bits in order, with the names QEMU uses in its messages.
    public static let named: [(BlockPermission, String)] = [
        (.consistentRead, "consistent read"), (.write, "write"),
        (.writeUnchanged, "write unchanged"), (.resize, "resize"),
    ]

    /// Bit index of a single permission (its lock-byte offset).
    public var bitIndex: Int { rawValue.trailingZeroBitCount }

    public var description: String {
        let names = Self.named.filter { contains($0.0) }.map(\.1)
        return names.isEmpty ? "none" : names.joined(separator: ", ")
    }
}
