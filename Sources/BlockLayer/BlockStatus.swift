/// The allocation state of a range of a node.
public struct BlockStatus: Equatable, Sendable {
    public struct Flags: OptionSet, Hashable, Sendable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// Reads come from stored data (not a hole).
        public static let data = Flags(rawValue: 1 << 0)
        /// Reads return zeroes.
        public static let zero = Flags(rawValue: 1 << 1)
        /// This node (not its backing chain) decides what the range reads as.
        public static let allocated = Flags(rawValue: 1 << 2)
        /// `offset` is where the range lives in the node's file.
        public static let offsetValid = Flags(rawValue: 1 << 3)
    }

    public var flags: Flags
    /// Length of the range that shares these flags, from the queried offset.
    public var length: Int64
    /// With `.offsetValid`: the host offset of the range.
    public var offset: Int64

    public init(flags: Flags, length: Int64, offset: Int64 = 0) {
        self.flags = flags
        self.length = length
        self.offset = offset
    }
}
