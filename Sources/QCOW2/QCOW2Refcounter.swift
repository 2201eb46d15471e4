import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// The refcount table and every refcount block of an image opened for
/// writing, held in memory so allocation and freeing are synchronous on the
/// loop. Changed blocks (and table clusters) are written back, in order,
/// by the driver's metadata writeback.
final class QCOW2Refcounter {
    let clusterSize: Int64
    let bits: Int
    let perBlock: Int64
    var tableOffset: UInt64
    var table: [UInt64]
    /// Refcount blocks by their host offset.
    var blocks: [UInt64: AlignedBuffer] = [:] {
        didSet { lastBlock = nil }
    }
    /// The block `block(at:)` found last. One block covers gigabytes of
    /// the file, so nearly every lookup hits it, without hashing.
    private var lastBlock: (offset: UInt64, block: AlignedBuffer)?
    var dirtyBlocks: Set<UInt64> = []
    /// Table clusters (indices) changed since the last writeback.
    var dirtyTableClusters: Set<Int> = []
    /// The end of everything allocated: clusters past it are free, and a
    /// cluster no free one below it can serve is allocated here.
    var allocationEnd: Int64
    /// No cluster below this one is free (refcount 0): set when the blocks
    /// are loaded, lowered by freeing, so
    /// freed clusters are handed out again, lowest first, as QEMU does:
    /// discarding and rewriting does not grow the file for ever.
    var firstFreeCandidate: Int64 = 0
    /// Data reads and in-place writes in flight, and the freed clusters
    /// they hold back from the allocator (see `QCOW2Driver.free`).
    var inFlight = QCOW2IOEpochs()
    /// Clusters lent out for `sendfile`, by count. A client that stops
    /// reading keeps its reply, and so these clusters, for as long as it
    /// likes: counted by epoch, they would hold back every cluster freed
    /// after them, so they are counted per cluster.
    var lentClusters: [Int64: Int] = [:]
    /// Whether any range was ever lent: from then on freed clusters are
    /// punched out of the file even without discard=unmap (see
    /// `BlockNode.discard(evenIfIgnored:)`).
    var hasLent = false
    /// Freed clusters that no I/O in flight holds any more, waiting only
    /// for their lent ranges to go out.
    var awaitingReturn: Set<Int64> = []
    /// Freed clusters on their way back to the allocator, which leaves
    /// them alone: held by I/O in flight (`inFlight`) or lent out
    /// (`lentClusters`), then punched out of the file (see
    /// `QCOW2Driver.free`).
    var awaitingPunch: Set<Int64> = []
    /// Clusters holding metadata, for overlap checks before data writes;
    /// the snapshots' L1 tables are in `snapshotL1Clusters`.
    var metadataClusters = QCOW2ClusterMap<Void>()
    /// The clusters of the snapshots' L1 tables, as runs: they can span
    /// billions of clusters (see `QCOW2ClusterRuns`).
    var snapshotL1Clusters = QCOW2ClusterRuns()

    /// Whether `cluster` holds metadata: what the overlap checks ask.
    func holdsMetadata(_ cluster: Int64) -> Bool {
        metadataClusters.contains(cluster) || (!snapshotL1Clusters.isEmpty && snapshotL1Clusters.contains(cluster))
    }

    /// Host offsets an L1 or L2 entry can hold are below 2^56 (QEMU's
    /// `QCOW_MAX_CLUSTER_OFFSET`): nothing is allocated from there on.
    static let hostOffsetLimit: Int64 = 1 << 56

    /// Takes `bytes` at the end of everything allocated, returning where
    /// they start; ENOSPC once the image would reach `hostOffsetLimit`.
    func claimAtEnd(_ bytes: Int64) throws -> Int64 {
        let start = allocationEnd
        guard bytes <= Self.hostOffsetLimit - start else {
            throw BlockError(errno: ENOSPC, "The image cannot grow past 2^56 bytes")
        }
        allocationEnd += bytes
        return start
    }

    init(header: QCOW2Header, table: [UInt64], fileLength: Int64) {
        clusterSize = Int64(header.clusterSize)
        bits = header.refcountBits
        perBlock = Int64(header.clusterSize * 8 / header.refcountBits)
        tableOffset = header.refcountTableOffset
        self.table = table
        allocationEnd = (fileLength + clusterSize - 1) / clusterSize * clusterSize
    }

    deinit {
        blocks.values.forEach { $0.deallocate() }
    }

    /// At most this many bytes of refcount blocks are loaded: half the
    /// memory this process may use (the machine's, or the lowest limit of
    /// its control groups). Every block is held in memory (see the type),
    /// and a table can name blocks all over a sparse file; past this, the
    /// open would end in the kernel's OOM killer instead of an error.
    static let defaultMemoryLimit: Int64 = {
        let pages = Int64(sysconf(Int32(_SC_PHYS_PAGES)))
        let pageSize = Int64(sysconf(Int32(_SC_PAGESIZE)))
        var memory = pages > 0 && pageSize > 0 ? pages * pageSize : .max
        if let limit = CgroupMemoryLimit.current() { memory = min(memory, limit) }
        return memory / 2
    }()

    /// Loads the table and every block it names; fails with a
    /// `QCOW2RefcountDamage` where they cannot be used, and with ENOMEM
    /// where they would take more than `memoryLimit` bytes.
    static func load(file: BlockNode, header: QCOW2Header,
                     memoryLimit: Int64 = defaultMemoryLimit) -> EventLoopFuture<QCOW2Refcounter> {
        let loop = file.eventLoop
        let tableBytes = Int(header.refcountTableClusters) * header.clusterSize
        guard Int64(header.refcountTableOffset) + Int64(tableBytes) <= file.length else {
            return loop.makeFailedFuture(QCOW2RefcountDamage.tablePastEnd)
        }
        return QCOW2Driver.readBytes(file, at: Int64(header.refcountTableOffset), count: tableBytes).flatMap { bytes in
            let reader = BigEndianReader(bytes)
            let table = (0..<(bytes.count / 8)).map { reader.u64(at: $0 * 8) }
            let refcounter = QCOW2Refcounter(header: header, table: table, fileLength: file.length)
            var offsets: [UInt64] = []
            var seen: Set<UInt64> = []
            for entry in table where entry != 0 {
                let offset = entry & ~UInt64(511)
                guard offset % UInt64(header.clusterSize) == 0, offset < QCOW2Header.maxSize else {
                    return loop.makeFailedFuture(QCOW2RefcountDamage.blockMisplaced(offset))
                }
                guard Int64(offset) + refcounter.clusterSize <= file.length else {
                    return loop.makeFailedFuture(QCOW2RefcountDamage.blockPastEnd(offset))
                }
                // Two table entries sharing a block would count two ranges
                // of clusters in the same bits: allocating in one would
                // change the other's refcounts.
                guard seen.insert(offset).inserted else {
                    return loop.makeFailedFuture(QCOW2RefcountDamage.blockShared(offset))
                }
                offsets.append(offset)
            }
            let needed = Int64(offsets.count) * refcounter.clusterSize
            guard needed <= memoryLimit else {
                return loop.makeFailedFuture(BlockError(errno: ENOMEM, """
                    qcow2: Opening the image for writing would load \(offsets.count) refcount blocks, \
                    \((needed + (1 << 20) - 1) >> 20) MiB, more than the \(memoryLimit >> 20) MiB allowed (half the memory this process may use); \
                    it can still be opened read-only
                    """))
            }
            let tableClusters = Int64(header.refcountTableClusters)
            for index in 0..<tableClusters {
                refcounter.metadataClusters.insert(Int64(header.refcountTableOffset) / refcounter.clusterSize + index)
            }
            return refcounter.loadBlocks(offsets, from: file).map {
                refcounter.findAllocationEnd()
                return refcounter
            }
        }
    }

    /// Reads the blocks at `offsets` one after another. Each read starts
    /// from a fresh loop task: reads the page cache answers at once would
    /// otherwise nest one call per block.
    private func loadBlocks(_ offsets: [UInt64], from file: BlockNode) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        let promise = loop.makePromise(of: Void.self)
        func load(_ position: Int) {
            guard position < offsets.count else { return promise.succeed(()) }
            let offset = offsets[position]
            guard let buffer = AlignedBuffer.allocate(count: Int(clusterSize), alignment: 4096) else {
                return promise.fail(BlockError.enomem)
            }
            file.read(at: Int64(offset), into: buffer.mutableBytes) { error in
                if let error {
                    buffer.deallocate()
                    return promise.fail(error)
                }
                self.blocks[offset] = buffer
                self.metadataClusters.insert(Int64(offset) / self.clusterSize)
                loop.execute { load(position + 1) }
            }
        }
        load(0)
        return promise.futureResult
    }

    /// Sets `allocationEnd` past every cluster in use, even where the file
    /// is shorter than its refcounts say, and `firstFreeCandidate` to the
    /// first free cluster a block covers, where reuse starts looking.
    /// Refcounts of clusters no L2 entry can name (past 2^56) are not
    /// counted, or a hostile image could put the end past any offset.
    private func findAllocationEnd() {
        var firstFree = Int64.max
        let clusterLimit = Self.hostOffsetLimit / clusterSize
        for (tableIndex, entry) in table.enumerated() where entry != 0 {
            let firstCluster = Int64(tableIndex) * perBlock
            guard firstCluster < clusterLimit, let block = blocks[entry & ~UInt64(511)] else { continue }
            var last = -1
            for index in 0..<Int(min(perBlock, clusterLimit - firstCluster)) {
                if QCOW2Refcounts.entry(block.bytes, index: index, bits: bits) != 0 {
                    last = index
                } else if firstFree == .max {
                    firstFree = firstCluster + Int64(index)
                }
            }
            if last >= 0 {
                allocationEnd = max(allocationEnd, (firstCluster + Int64(last) + 1) * clusterSize)
            }
        }
        firstFreeCandidate = min(firstFree, allocationEnd / clusterSize)
    }

    private func location(of cluster: Int64) -> (tableIndex: Int, index: Int) {
        (Int(cluster / perBlock), Int(cluster % perBlock))
    }

    /// The refcount of a cluster (0 where no block covers it).
    func refcount(_ cluster: Int64) -> UInt64 {
        let (tableIndex, index) = location(of: cluster)
        guard tableIndex < table.count else { return 0 }
        let offset = table[tableIndex] & ~UInt64(511)
        guard offset != 0, let block = block(at: offset) else { return 0 }
        return QCOW2Refcounts.entry(block.bytes, index: index, bits: bits)
    }

    /// The refcount block at `offset`, if loaded.
    @inline(__always)
    private func block(at offset: UInt64) -> AlignedBuffer? {
        if let lastBlock, lastBlock.offset == offset { return lastBlock.block }
        guard let block = blocks[offset] else { return nil }
        lastBlock = (offset, block)
        return block
    }

    var maxRefcount: UInt64 { bits == 64 ? UInt64.max : (1 << UInt64(bits)) - 1 }

    /// Adds `delta` to a cluster's refcount. Fails (changing nothing) on
    /// overflow, underflow, or a cluster no block covers after allocating.
    func adjust(_ cluster: Int64, by delta: Int64) throws {
        let (tableIndex, index) = location(of: cluster)
        guard tableIndex < table.count, case let offset = table[tableIndex] & ~UInt64(511), offset != 0,
              let block = block(at: offset) else {
            throw BlockError(errno: EIO, "No refcount block covers cluster \(cluster)")
        }
        let current = QCOW2Refcounts.entry(block.bytes, index: index, bits: bits)
        if delta < 0 {
            guard current >= UInt64(-delta) else {
                throw BlockError(errno: EIO, "Refcount of cluster \(cluster) would drop below zero")
            }
        } else {
            guard maxRefcount - current >= UInt64(delta) else {
                throw BlockError(errno: EIO, "Refcount of cluster \(cluster) would overflow")
            }
        }
        let value = delta < 0 ? current - UInt64(-delta) : current + UInt64(delta)
        QCOW2Refcounter.store(block.mutableBytes, index: index, bits: bits, value: value)
        dirtyBlocks.insert(offset)
    }

    static func store(_ block: UnsafeMutableRawBufferPointer, index: Int, bits: Int, value: UInt64) {
        if bits < 8 {
            let bitOffset = index * bits
            let shift = UInt8(bitOffset % 8)
            let mask = UInt8((1 << bits) - 1) << shift
            block[bitOffset / 8] = (block[bitOffset / 8] & ~mask) | (UInt8(truncatingIfNeeded: value) << shift) & mask
        } else {
            let bytes = bits / 8
            for position in 0..<bytes {
                block[index * bytes + position] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (bytes - 1 - position)))
            }
        }
    }

    /// True when the table cannot describe clusters a little past the end
    /// of the file: the caller must grow it before allocating.
    var needsLargerTable: Bool {
        (allocationEnd / clusterSize + 16) / perBlock >= Int64(table.count)
    }

    /// Makes sure a refcount block covers `cluster`, placing a new block at
    /// the end of the file if needed (it describes itself when it falls in
    /// its own range).
    func ensureBlock(for cluster: Int64) throws {
        let (tableIndex, _) = location(of: cluster)
        guard tableIndex < table.count else {
            throw BlockError(errno: ENOSPC, "The refcount table is full")
        }
        guard table[tableIndex] == 0 else { return }
        guard let buffer = AlignedBuffer.zeroed(count: Int(clusterSize), alignment: 4096) else {
            throw BlockError.enomem
        }
        let blockOffset: UInt64
        do {
            blockOffset = UInt64(try claimAtEnd(clusterSize))
        } catch {
            buffer.deallocate()
            throw error
        }
        blocks[blockOffset] = buffer
        table[tableIndex] = blockOffset
        dirtyBlocks.insert(blockOffset)
        dirtyTableClusters.insert(tableIndex * 8 / Int(clusterSize))
        metadataClusters.insert(Int64(blockOffset) / clusterSize)
        do {
            try ensureBlock(for: Int64(blockOffset) / clusterSize)
            try adjust(Int64(blockOffset) / clusterSize, by: 1)
        } catch {
            // No memory for the block that would count this one: take this
            // one back, so that it never reaches the disk uncounted. (Its
            // place in the file stays unused until the image is reopened.)
            table[tableIndex] = 0
            blocks[blockOffset] = nil
            buffer.deallocate()
            dirtyBlocks.remove(blockOffset)
            metadataClusters.remove(Int64(blockOffset) / clusterSize)
            throw error
        }
    }

    /// Drops one reference to `cluster`; at zero (true) the cluster is free
    /// for the allocator again.
    @discardableResult
    func release(_ cluster: Int64) -> Bool {
        guard (try? adjust(cluster, by: -1)) != nil, refcount(cluster) == 0 else { return false }
        metadataClusters.remove(cluster)
        firstFreeCandidate = min(firstFreeCandidate, cluster)
        return true
    }

    /// The hole is punched: a free `cluster` is the allocator's again.
    func finishPunch(_ cluster: Int64) {
        guard awaitingPunch.remove(cluster) != nil, refcount(cluster) == 0 else { return }
        firstFreeCandidate = min(firstFreeCandidate, cluster)
    }

    /// The lowest free cluster below `allocationEnd` that a refcount block
    /// already covers, or nil. The search resumes where the last one ended,
    /// so allocating costs no more than one pass over the refcounts between
    /// frees.
    private func takeFreeCluster() -> Int64? {
        let end = allocationEnd / clusterSize
        var cluster = firstFreeCandidate
        defer { firstFreeCandidate = cluster }
        while cluster < end {
            let (tableIndex, first) = location(of: cluster)
            let blockStart = Int64(tableIndex) * perBlock
            guard tableIndex < table.count else { break }
            let offset = table[tableIndex] & ~UInt64(511)
            guard offset != 0, let block = blocks[offset] else {
                // Uncovered clusters would need a new block first: leave them.
                cluster = blockStart + perBlock
                continue
            }
            let limit = Int(min(perBlock, end - blockStart))
            for index in first..<limit where QCOW2Refcounts.entry(block.bytes, index: index, bits: bits) == 0 {
                let candidate = blockStart + Int64(index)
                if holdsMetadata(candidate) || awaitingPunch.contains(candidate) { continue }
                cluster = candidate + 1
                return candidate
            }
            cluster = blockStart + Int64(limit)
        }
        cluster = max(cluster, end)
        return nil
    }

    /// Allocates one cluster with refcount 1: the lowest free one, or one at
    /// the end of the file.
    func allocateCluster() throws -> UInt64 {
        if let free = takeFreeCluster() {
            try adjust(free, by: 1)
            return UInt64(free * clusterSize)
        }
        let host = try claimAtEnd(clusterSize)
        try ensureBlock(for: host / clusterSize)
        try adjust(host / clusterSize, by: 1)
        return UInt64(host)
    }
}
