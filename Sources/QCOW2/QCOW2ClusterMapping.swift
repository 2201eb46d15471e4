/// What a guest range maps to, decoded from an L2 entry (and, with
/// extended L2, its subcluster bitmap).
public enum QCOW2ClusterMapping: Equatable, Sendable {
    /// Nothing here: the backing file, or zeroes without one.
    case unallocated
    /// An unallocated subcluster (extended L2) of a cluster that has host
    /// space: it reads like `unallocated`, but block status reports where
    /// the space is, as QEMU's `qemu-img map` does.
    case unallocatedSubcluster(hostOffset: UInt64)
    /// Reads as zeroes; `hostOffset` is non-nil when space stays allocated.
    case zero(hostOffset: UInt64?)
    /// Data at `hostOffset` in the data file.
    case data(hostOffset: UInt64)
    /// A compressed cluster: `size` bytes at `hostOffset` hold the whole cluster.
    case compressed(hostOffset: UInt64, size: Int)
}

/// Bit layout of L1 and L2 entries.
public enum QCOW2Entry {
    public static let copied: UInt64 = 1 << 63
    public static let compressed: UInt64 = 1 << 62
    public static let zeroFlag: UInt64 = 1
    /// Bits 9–55: a cluster-aligned host offset.
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    /// Bits that must be zero in a standard L2 entry (1–8, 56–61).
    static let l2ReservedMask: UInt64 = 0x3f00_0000_0000_01fe
    /// Bits that must be zero in an L1 entry (0–8, 56–62).
    static let l1ReservedMask: UInt64 = 0x7f00_0000_0000_01ff

    /// The host cluster of a standard L2 entry that maps plain data; nil
    /// for anything else (unallocated, zero, compressed, or an entry a
    /// correct image cannot contain). The one test most reads make, ahead
    /// of the full decode: whenever it answers, `mapping` answers `.data`
    /// at the same offset (without an external data file).
    @inline(__always)
    static func plainDataCluster(_ entry: UInt64, clusterSize: Int64) -> UInt64? {
        let host = entry & offsetMask
        guard entry & (compressed | zeroFlag | l2ReservedMask) == 0, host != 0,
              host & UInt64(clusterSize - 1) == 0 else { return nil }
        return host
    }

    /// Whether QEMU refuses an extended-L2 entry whole, reads and writes
    /// alike, whatever subcluster they touch: a subcluster both allocated
    /// and zero in a cluster with host space, or one allocated in a cluster
    /// without. (Compressed entries are judged elsewhere.)
    public static func hasInvalidBitmap(entry: UInt64, bitmap: UInt64, externalData: Bool) -> Bool {
        guard entry & compressed == 0 else { return false }
        let allocatedBits = bitmap & 0xffff_ffff
        guard entry & offsetMask != 0 || (externalData && entry & copied != 0) else { return allocatedBits != 0 }
        return allocatedBits & (bitmap >> 32) != 0
    }

    /// The mapping of subcluster `subcluster` of an entry; `bitmap` is the
    /// extended-L2 bitmap (nil for standard L2). Returns nil for entries a
    /// correct image cannot contain.
    /// With an external data file, offset 0 is a real place: an entry is
    /// allocated there when COPIED is set (QEMU's rule).
    public static func mapping(entry: UInt64, bitmap: UInt64?, subcluster: Int,
                               clusterBits: UInt32, externalData: Bool = false) -> QCOW2ClusterMapping? {
        if entry & compressed != 0 {
            // Bits 0..x-1: host byte offset; x..61: extra 512-byte sectors.
            let x = UInt64(62 - (clusterBits - 8))
            let hostOffset = entry & ((1 << x) - 1)
            let sectors = ((entry >> x) & ((1 << UInt64(clusterBits - 8)) - 1)) + 1
            let size = Int(sectors * 512) - Int(hostOffset & 511)
            guard size > 0 else { return nil }
            return .compressed(hostOffset: hostOffset, size: size)
        }
        let hostOffset = entry & offsetMask
        if let bitmap {
            // QEMU judges the whole bitmap whatever the subcluster asked
            // for: a cluster with host space must not have a subcluster both
            // allocated and zero, one without must have none allocated. The
            // zero flag (bit 0) means nothing here.
            guard !hasInvalidBitmap(entry: entry, bitmap: bitmap, externalData: externalData) else { return nil }
            let allocatedBits = bitmap & 0xffff_ffff
            let zeroBits = bitmap >> 32
            let bit: UInt64 = 1 << UInt64(subcluster)
            guard hostOffset != 0 || (externalData && entry & copied != 0) else {
                return zeroBits & bit != 0 ? .zero(hostOffset: nil) : .unallocated
            }
            if zeroBits & bit != 0 { return .zero(hostOffset: hostOffset) }
            return allocatedBits & bit != 0 ? .data(hostOffset: hostOffset) : .unallocatedSubcluster(hostOffset: hostOffset)
        }
        if entry & zeroFlag != 0 {
            return .zero(hostOffset: hostOffset == 0 ? nil : hostOffset)
        }
        if hostOffset == 0, !(externalData && entry & copied != 0) { return .unallocated }
        return .data(hostOffset: hostOffset)
    }
}
