import BlockLayer
#if canImport(Glibc)
import Glibc
#endif

/// A new refcount structure computed from the references the other
/// metadata holds: what `qemu-img check -r all` writes when the old table
/// or its blocks cannot be used.
///
/// Pure planning, no I/O. New blocks and the table take the lowest free
/// clusters, as qemu-img places them, and never a cluster the old structure
/// occupies: until the header names the new table, the old one stays
/// intact, so a crash mid-rebuild loses nothing. In the new counts the old
/// structure's clusters are free.
struct QCOW2RefcountRebuild {
    let clusterSize: Int64
    let refcountBits: Int
    /// Refcounts per block.
    let perBlock: Int64
    /// Every cluster's new refcount: the references, plus one for each
    /// cluster of the new structure.
    private(set) var refcounts: [Int64: Int]
    /// The new blocks' clusters by table index.
    private(set) var blocks: [Int64: Int64] = [:]
    /// The table's first cluster and its length in clusters.
    private(set) var tableStart: Int64 = 0
    private(set) var tableClusters: Int64 = 0

    private var taken: Set<Int64>
    private var firstFree: Int64 = 0

    /// - Parameters:
    ///   - references: what each cluster should count, leaving out the old
    ///     refcount table and blocks;
    ///   - occupied: every cluster in use now, the old structure included.
    init(references: [Int64: Int], occupied: Set<Int64>, clusterSize: Int64, refcountBits: Int) throws {
        self.clusterSize = clusterSize
        self.refcountBits = refcountBits
        perBlock = clusterSize * 8 / Int64(refcountBits)
        refcounts = references
        taken = occupied.union(references.keys)
        let maxRefcount = refcountBits == 64 ? Int.max : (1 << refcountBits) - 1
        if let (cluster, count) = references.first(where: { $0.value > maxRefcount }) {
            throw BlockError(errno: EIO, "Cluster \(cluster) has \(count) references, more than \(refcountBits)-bit refcounts can hold")
        }
        // Blocks for every range with a count (the table's own, once it
        // has clusters), then a table naming them; until it is big enough
        // for the blocks its own clusters needed, go again.
        while true {
            try coverCountedRanges()
            let entries = (blocks.keys.max() ?? 0) + 1
            let needed = max(1, (entries * 8 + clusterSize - 1) / clusterSize)
            if tableClusters >= needed { break }
            if tableClusters > 0 { releaseTable() }
            guard UInt64(needed) * UInt64(clusterSize) <= QCOW2Header.maxRefcountTableBytes else {
                throw BlockError(errno: ENOSPC, "The rebuilt refcount table would be too large")
            }
            tableStart = try claim(needed)
            tableClusters = needed
        }
    }

    /// Gives every range of clusters with a refcount a block, lowest range
    /// first; a new block may fall in a range of its own that needs one.
    private mutating func coverCountedRanges() throws {
        var missing = Set(refcounts.keys.map { $0 / perBlock }).subtracting(blocks.keys).sorted()
        while !missing.isEmpty {
            for index in missing { blocks[index] = try claim(1) }
            missing = Set(refcounts.keys.map { $0 / perBlock }).subtracting(blocks.keys).sorted()
        }
    }

    /// Takes the lowest run of `count` free clusters, counting each once.
    private mutating func claim(_ count: Int64) throws -> Int64 {
        var start = firstFree
        var end = start
        while end < start + count {
            if taken.contains(end) {
                start = end + 1
            }
            end += 1
        }
        guard (start + count) * clusterSize <= QCOW2Refcounter.hostOffsetLimit else {
            throw BlockError(errno: ENOSPC, "The image cannot grow past 2^56 bytes")
        }
        for cluster in start..<start + count {
            taken.insert(cluster)
            refcounts[cluster, default: 0] += 1
        }
        if count == 1 { firstFree = start + 1 }
        return start
    }

    /// Gives back a table too small to name every block (not written yet).
    private mutating func releaseTable() {
        for cluster in tableStart..<tableStart + tableClusters {
            taken.remove(cluster)
            refcounts[cluster] = nil
        }
        firstFree = min(firstFree, tableStart)
        tableClusters = 0
    }

    /// The refcount table, big-endian.
    var tableBytes: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(tableClusters * clusterSize))
        for (index, cluster) in blocks {
            let offset = UInt64(cluster * clusterSize)
            for byte in 0..<8 { bytes[Int(index) * 8 + byte] = UInt8(truncatingIfNeeded: offset >> UInt64(56 - 8 * byte)) }
        }
        return bytes
    }

    /// Each block's bytes, by the block's own cluster.
    var blockBytes: [Int64: [UInt8]] {
        var result: [Int64: [UInt8]] = [:]
        for cluster in blocks.values { result[cluster] = [UInt8](repeating: 0, count: Int(clusterSize)) }
        for (cluster, count) in refcounts {
            let block = blocks[cluster / perBlock]!
            result[block]!.withUnsafeMutableBytes { bytes in
                QCOW2Refcounter.store(bytes, index: Int(cluster % perBlock), bits: refcountBits, value: UInt64(count))
            }
        }
        return result
    }
}
