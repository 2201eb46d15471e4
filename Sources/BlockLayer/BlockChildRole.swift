/// What a child is to its parent; decides the permissions a parent takes on
/// it by default (QEMU's BdrvChildRole).
public struct BlockChildRole: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Holds guest data.
    public static let data = BlockChildRole(rawValue: 1 << 0)
    /// Holds the parent's metadata (a format's tables).
    public static let metadata = BlockChildRole(rawValue: 1 << 1)
    /// The parent shows this child's data unchanged (filters, plain raw).
    public static let filtered = BlockChildRole(rawValue: 1 << 2)
    /// A backing file: read where the parent has nothing.
    public static let cow = BlockChildRole(rawValue: 1 << 3)
    /// The parent's main child (at most one).
    public static let primary = BlockChildRole(rawValue: 1 << 4)

    /// The file child of a format such as qcow2.
    public static let image: BlockChildRole = [.data, .metadata, .primary]
    /// The file child of raw without offset/size, and of filters.
    public static let filteredPrimary: BlockChildRole = [.filtered, .primary]
    public static let backing: BlockChildRole = [.cow]
}
