import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Options of a qcow2 node, named as QEMU names them.
public struct QCOW2Options: Sendable {
    public var readOnly = true
    /// Serve this internal snapshot (name or id), read-only: `qemu-nbd -l`.
    public var snapshot: SnapshotReference?
    /// Bytes of L2 tables to cache; nil for QEMU's default (enough to map
    /// the whole image, at most 32 MiB).
    public var l2CacheSize: Int?
    /// Opened by `check -r` (QEMU's BDRV_O_CHECK): a refcount structure
    /// that cannot be loaded but can be rebuilt does not fail the open, the
    /// corrupt bit does not refuse it, and a dirty lazy-refcounts image is
    /// left for the check to repair and report (see `markConsistent`).
    public var forRepair = false
    /// Opened by `check` without `-r`: metadata qemu-img would check rather
    /// than refuse is read as QEMU reads it (an L1 table past the end of
    /// the file reads as zeroes there), for the check to report.
    public var forCheck = false
    /// Opened by `check -r all` (QEMU's BDRV_FIX_ERRORS; set with
    /// `forRepair`): snapshot table entries with more extra data than QEMU
    /// allows are cut to its limit as they are read, and the entries past
    /// its limit on the table's size dropped, not refused.
    public var forRepairAll = false

    public init(readOnly: Bool = true, snapshot: SnapshotReference? = nil, l2CacheSize: Int? = nil, forRepair: Bool = false,
                forCheck: Bool = false) {
        self.readOnly = readOnly
        self.snapshot = snapshot
        self.l2CacheSize = l2CacheSize
        self.forRepair = forRepair
        self.forCheck = forCheck
    }
}

/// The qcow2 format driver.
///
/// Children: `file` (the image, role image), optionally `data-file` (an
/// external data file) and `backing`. Reads map guest ranges through the
/// L1 table and cached L2 tables, then read data, zeroes, the backing file
/// or decompressed clusters; runs of neighbouring clusters become one read.
public final class QCOW2Driver: BlockDriver {
    public let formatName = "qcow2"
    public internal(set) var header: QCOW2Header
    let geometry: QCOW2Geometry
    public let options: QCOW2Options
    /// The L1 table in host byte order (the active one, or the snapshot's).
    var l1: [UInt64]
    public internal(set) var snapshots: [QCOW2Snapshot]
    /// Bytes the snapshot table occupies.
    public internal(set) var snapshotTableLength = 0
    /// Snapshot table entries whose extra data `check -r all` cut to
    /// QEMU's limit as it read them: the table is to be written again.
    public internal(set) var droppedSnapshotExtraData: [QCOW2SnapshotTable.DroppedExtraData] = []
    /// Snapshot table entries `check -r all` dropped from the end as it read
    /// the table (past QEMU's limits): the header is to count the rest.
    public internal(set) var overhangingSnapshots = 0
    let l2Cache: QCOW2L2Cache
    /// L2 tables being read, with the requests waiting for them.
    var l2Loads: [UInt64: [(Result<QCOW2L2Table, BlockError>) -> Void]] = [:]
    private let guestSize: Int64
    weak var node: BlockNode?
    /// Whether the image looks metadata-preallocated (decided on the first
    /// block status, as QEMU does): only then do data clusters over holes
    /// of the file report as zero.
    var metadataPreallocation: Bool?
    var preallocationWaiters: [(Bool) -> Void] = []

    // Writing (nil / empty while read-only).
    var refcounter: QCOW2Refcounter?
    /// Changed L2 tables by offset, held here until written back.
    var dirtyL2: [UInt64: QCOW2L2Table] = [:]
    /// Tables in use by an allocation or a writeback, with use counts: the
    /// cache may drop them, but lookups must keep finding these objects,
    /// never a second copy read from disk.
    var pinnedL2: [UInt64: (table: QCOW2L2Table, uses: Int)] = [:]
    var dirtyL1: Set<Int> = []
    /// Guest clusters being allocated, with the requests waiting for them.
    var allocating: [Int64: [() -> Void]] = [:]
    var metadataBusy = false
    var metadataWaiters: [() -> Void] = []
    /// Host ranges to release once the tables that dropped them are on disk.
    var pendingFrees: [(UInt64, Int64)] = []
    /// Freed ranges being punched out of the file, and the flushes waiting
    /// for them (see `flush`).
    var punchesInFlight = 0
    var punchWaiters: [() -> Void] = []
    var scratchBuffers: [UnsafeMutableRawPointer] = []
    /// Records of data reads and in-place writes in flight (see
    /// `countingUse`) that have ended, for the next ones to take.
    var idleDataUses: [InFlightRequest] = []
    /// Why the image was marked corrupt while open; from then on it takes
    /// no more changes (see `changeRefusal`).
    var corruptReason: String?
    /// The header write setting the corrupt bit, in flight or done; nil
    /// before one, or after one failed (the next corruption tries again).
    var corruptMarking: EventLoopFuture<Void>?
    /// Whether a read has reported a corruption (QEMU tells once per open).
    var readCorruptionSignalled = false
    /// The header write issued last (see `rewriteHeader`).
    var lastHeaderWrite: EventLoopFuture<Void>?
    /// Header writes not yet ended; a flush waits for them.
    var headerWritesInFlight = 0
    /// A grown refcount table the header does not name yet (see the type).
    var tableMove: QCOW2RefcountTableMove?
    /// Why the metadata in memory can no longer be written back (memory ran
    /// out halfway through a table move): no more changes, and every flush
    /// fails, so no write is reported safe that is not.
    var metadataFault: String?
    /// Set on an open for repair whose refcount structure could not be
    /// loaded: nothing may be allocated until `rebuildRefcounts` has run.
    public internal(set) var refcountDamage: QCOW2RefcountDamage?

    /// Whether the header as opened had a stale bitmaps extension (see
    /// `QCOW2Header.hasStaleBitmapsExtension`), which QEMU warns of on
    /// every open; a read-write open drops it from `header`.
    public let openedWithStaleBitmaps: Bool

    init(header: QCOW2Header, l1: [UInt64], snapshots: [QCOW2Snapshot], guestSize: Int64, options: QCOW2Options) {
        self.header = header
        openedWithStaleBitmaps = header.hasStaleBitmapsExtension
        geometry = QCOW2Geometry(header)
        self.l1 = l1
        self.snapshots = snapshots
        self.guestSize = guestSize
        self.options = options
        let defaultCache = min(Int64(32 << 20), max(Int64(1 << 20), header.l1EntriesNeeded * Int64(header.clusterSize)))
        let bytes = options.l2CacheSize.map(Int64.init) ?? defaultCache
        l2Cache = QCOW2L2Cache(capacity: Int(bytes / Int64(header.clusterSize)))
    }

    public func didAttach(to node: BlockNode) {
        self.node = node
    }

    /// The image file node, known from the open on (before the node exists).
    var openedFile: BlockNode?
    /// The persistent bitmaps' directory, when the image has bitmaps in use.
    var bitmapDirectory: QCOW2BitmapDirectory?
    /// The image file: the primary child (role `.image`, named `file`).
    var file: BlockNode { node?.primaryChild?.node ?? openedFile! }
    /// Where data clusters live: the external data file, or the image.
    /// (Every read asks: without the external data file bit, no lookup.)
    var dataFile: BlockNode {
        guard externalData else { return file }
        return node?.child(named: "data-file")?.node ?? file
    }
    var backingNode: BlockNode? { node?.backing?.node }

    public var length: Int64 { guestSize }

    public var supportedWriteFlags: BlockRequestFlags { [] }

    deinit {
        scratchBuffers.forEach { $0.deallocate() }
    }

    /// Opens a qcow2 image whose bytes `file` serves: reads and checks the
    /// header, the L1 table and the snapshot table.
    public static func open(file: BlockNode, options: QCOW2Options) -> EventLoopFuture<QCOW2Driver> {
        let loop = file.eventLoop
        let headerBytes = Int(min(file.length, Int64(2 << 20)))
        return readBytes(file, at: 0, count: headerBytes).flatMapThrowing { bytes -> QCOW2Header in
            let header = try QCOW2Header.parse(bytes, forCheck: options.forCheck || options.forRepair,
                                               readOnly: options.readOnly)
            // Nothing in an image names an offset from 2^61 on; a longer
            // file (sparse, near 2^63) would overflow the sums that round
            // the file's length up to whole clusters.
            guard file.length <= Int64(QCOW2Header.maxSize) else {
                throw QCOW2Error("qcow2: Image file is larger than 2^61 bytes (\(file.length)); no qcow2 image can use that")
            }
            if header.incompatibleFeatures.contains(.corrupt), !options.readOnly, !options.forRepair {
                throw QCOW2Error("qcow2: Image is corrupt; cannot be opened read/write")
            }
            return header
        }.flatMap { header -> EventLoopFuture<(QCOW2Header, QCOW2SnapshotTable)> in
            guard header.snapshotCount > 0 else {
                return loop.makeSucceededFuture((header, .none))
            }
            // The table's size is unknown until parsed: read what can hold it.
            let available = max(0, file.length - Int64(header.snapshotsOffset))
            let count = Int(min(available, Int64(QCOW2Snapshot.maxTableBytes)))
            return readBytes(file, at: Int64(header.snapshotsOffset), count: count).flatMapThrowing { bytes in
                // A check reads the table as qemu-img check does; a server
                // refuses a table past the end of the file.
                let table = try QCOW2SnapshotTable(
                    parsing: bytes, count: Int(header.snapshotCount), fileBytes: Int(available),
                    clusterSize: header.clusterSize, forCheck: options.forCheck || options.forRepair, repairing: options.forRepairAll)
                // A table ending a cluster or more past the end of the file
                // is not repaired: freeing the old one would free clusters
                // the file does not have (qemu-img's free fails, and whether
                // its repair does depends on where its new table goes).
                if options.forRepair, Int64(header.snapshotsOffset) + Int64(table.length) - file.length >= header.clusterSize {
                    throw QCOW2Error("Snapshot table truncated")
                }
                return (header, table)
            }
        }.flatMap { header, table -> EventLoopFuture<QCOW2Driver> in
            var header = header
            let snapshots = table.snapshots
            // Entries a repair drops are gone from the count the check and
            // the repair work with (`writeSnapshotCount` makes it so on disk).
            header.snapshotCount = UInt32(snapshots.count)
            var l1Offset = header.l1TableOffset
            var l1Size = header.l1Size
            var size = Int64(header.size)
            if let wanted = options.snapshot {
                guard let snapshot = wanted.select(from: snapshots, id: \.id, name: \.name) else {
                    return loop.makeFailedFuture(QCOW2Error("Can't find snapshot '\(wanted)'").blockError)
                }
                guard UInt64(snapshot.l1Size) * 8 <= QCOW2Header.maxL1Bytes, snapshot.l1TableOffset % UInt64(header.clusterSize) == 0 else {
                    return loop.makeFailedFuture(QCOW2Error("Snapshot L1 table invalid").blockError)
                }
                l1Offset = snapshot.l1TableOffset
                l1Size = snapshot.l1Size
                if let diskSize = snapshot.diskSize, diskSize <= QCOW2Header.maxSize { size = Int64(diskSize) }
                guard Int64(l1Size) * header.bytesPerL2 >= size else {
                    return loop.makeFailedFuture(QCOW2Error("Snapshot L1 table is too small").blockError)
                }
            }
            let l1Bytes = Int(l1Size) * 8
            // What a plain check finds past the end reads as zeroes, as in
            // QEMU; anything else refuses the table (a repair would free
            // every cluster the lost entries named).
            let available = Int(max(0, min(Int64(l1Bytes), file.length - Int64(l1Offset))))
            guard l1Bytes == 0 || available == l1Bytes || options.forCheck && options.readOnly else {
                return loop.makeFailedFuture(QCOW2Error("L1 table lies past the end of the image file").blockError)
            }
            return readPaddingWithZeroes(file, at: l1Offset, count: l1Bytes).map { bytes in
                let reader = BigEndianReader(bytes)
                let l1 = (0..<Int(l1Size)).map { reader.u64(at: $0 * 8) }
                // Whole sectors, as QEMU counts the guest size: a size off
                // the 512-byte grid (no qemu-img makes one) is cut down.
                let driver = QCOW2Driver(header: header, l1: l1, snapshots: snapshots, guestSize: size & ~511,
                                         options: options)
                driver.snapshotTableLength = table.length
                driver.droppedSnapshotExtraData = table.droppedExtraData
                driver.overhangingSnapshots = table.overhanging
                driver.openedFile = file
                return driver
            }.flatMap { driver in
                QCOW2BitmapDirectory.load(file: file, header: header).map { directory in
                    driver.bitmapDirectory = directory
                    return driver
                }
            }.flatMap { driver in
                guard !options.readOnly, options.snapshot == nil else { return loop.makeSucceededFuture(driver) }
                return driver.prepareForWriting(file: file).map { driver }
            }
        }
    }

    /// Reads `count` bytes of metadata into an array (a cold path).
    static func readBytes(_ node: BlockNode, at offset: Int64, count: Int) -> EventLoopFuture<[UInt8]> {
        let promise = node.eventLoop.makePromise(of: [UInt8].self)
        guard count > 0 else {
            promise.succeed([])
            return promise.futureResult
        }
        guard let buffer = AlignedBuffer.allocate(count: count, alignment: 4096) else {
            promise.fail(BlockError.enomem)
            return promise.futureResult
        }
        node.read(at: offset, into: buffer.mutableBytes) { error in
            defer { buffer.deallocate() }
            if let error { return promise.fail(error) }
            promise.succeed(Array(buffer.bytes))
        }
        return promise.futureResult
    }

    /// `count` bytes at `offset`; what lies past the end of the file reads
    /// as zeroes, as through QEMU's file driver (metadata a damaged image
    /// names there is then judged as empty instead of failing the read).
    static func readPaddingWithZeroes(_ node: BlockNode, at offset: UInt64, count: Int) -> EventLoopFuture<[UInt8]> {
        let length = UInt64(node.length)
        let inFile = offset < length ? min(count, Int(length - offset)) : 0
        guard inFile > 0 else { return node.eventLoop.makeSucceededFuture([UInt8](repeating: 0, count: count)) }
        return readBytes(node, at: Int64(offset), count: inFile).map {
            inFile == count ? $0 : $0 + [UInt8](repeating: 0, count: count - inFile)
        }
    }

    /// Writes metadata bytes through to the disk (FUA; a cold path),
    /// followed by zeroes up to `length` when that is longer.
    static func writeBytes(_ node: BlockNode, _ bytes: [UInt8], at offset: Int64,
                           zeroFilledTo length: Int = 0) -> EventLoopFuture<Void> {
        let promise = node.eventLoop.makePromise(of: Void.self)
        let buffer = length > bytes.count
            ? AlignedBuffer.zeroed(count: length, alignment: 4096)
            : AlignedBuffer.allocate(count: bytes.count, alignment: 4096)
        guard let buffer else {
            promise.fail(BlockError.enomem)
            return promise.futureResult
        }
        buffer.pointer.copyMemory(from: bytes, byteCount: bytes.count)
        node.write(at: offset, from: buffer.bytes, flags: .fua) { error in
            buffer.deallocate()
            if let error { promise.fail(error) } else { promise.succeed(()) }
        }
        return promise.futureResult
    }

    /// Loads refcounts, notes where metadata lives (for overlap checks),
    /// repairs refcounts left stale by lazy refcounts, and clears unknown
    /// autoclear bits and drops a stale bitmaps extension, as QEMU does on
    /// a read-write open.
    func prepareForWriting(file: BlockNode) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        return QCOW2Refcounter.load(file: file, header: header).flatMapThrowing { refcounter -> QCOW2Refcounter? in
            // A refcount block or table on top of other metadata would have
            // every allocation write counts over that table, and the
            // table's writes change counts.
            let others = self.clustersOfOtherMetadata()
            let snapshotL1s = self.clustersOfSnapshotL1Tables()
            let clusterSize = Int64(self.header.clusterSize)
            let overlaps = { (cluster: Int64) in others.contains(cluster) || snapshotL1s.contains(cluster) }
            if let block = refcounter.blocks.keys.sorted().first(where: { overlaps(Int64($0) / clusterSize) }) {
                throw QCOW2RefcountDamage.overlapsMetadata(block)
            }
            let tableStart = Int64(self.header.refcountTableOffset) / clusterSize
            if let cluster = (tableStart..<tableStart + Int64(self.header.refcountTableClusters)).first(where: overlaps) {
                throw QCOW2RefcountDamage.overlapsMetadata(UInt64(cluster * clusterSize))
            }
            refcounter.metadataClusters.formUnion(others)
            refcounter.snapshotL1Clusters = snapshotL1s
            return refcounter
        }.flatMapError { error in
            guard let damage = error as? QCOW2RefcountDamage else { return loop.makeFailedFuture(error) }
            guard self.options.forRepair else { return loop.makeFailedFuture(damage.blockError) }
            // The check rebuilds the structure, then prepares again. Until
            // then the driver stays read-only (no refcounter).
            self.refcountDamage = damage
            return loop.makeSucceededFuture(nil)
        }.flatMap { refcounter in
            guard let refcounter else { return loop.makeSucceededVoidFuture() }
            self.refcounter = refcounter
            var steps = loop.makeSucceededVoidFuture()
            // Opened for a check's repair, the check finds and reports the
            // stale counts itself, and clears the bit only if it fixed them.
            let repairing = self.options.forRepair
            if self.header.incompatibleFeatures.contains(.dirty), !repairing {
                steps = steps.flatMap { self.repairRefcounts(file: file) }.flatMap {
                    self.clearFlags(.dirty, file: file)
                }
            }
            if self.header.compatibleFeatures.contains(.lazyRefcounts), !repairing {
                // As QEMU: while open for writing, the dirty bit says the
                // refcounts may be stale; a clean close clears it.
                steps = steps.flatMap {
                    self.header.incompatibleFeatures.insert(.dirty)
                    return self.rewriteHeader(file: file)
                }
            }
            // A repair changes metadata, never guest data, so the bitmaps
            // stay true: flagged in-use, backup tools would drop them and
            // start over with a full copy.
            if self.header.autoclearFeatures.contains(.bitmaps), !repairing {
                steps = steps.flatMap { self.markBitmapsInUse(file: file) }
            }
            let unknownAutoclear = self.header.autoclearFeatures.subtracting(QCOW2Header.AutoclearFeatures.known)
            // A bitmaps extension without its autoclear bit was left by a
            // program that wrote without keeping the bitmaps: QEMU ignores
            // it and drops it from the header (its clusters leak).
            let staleBitmaps = self.header.hasStaleBitmapsExtension
            if !unknownAutoclear.isEmpty || staleBitmaps {
                steps = steps.flatMap {
                    self.header.autoclearFeatures.subtract(unknownAutoclear)
                    if staleBitmaps { self.header.extensions.removeAll { $0.type == QCOW2HeaderExtension.bitmaps } }
                    return self.rewriteHeader(file: file)
                }
            }
            return steps
        }
    }

    /// The clusters of the header, the L1 table, the active L2 tables and
    /// the snapshot table (for overlap checks).
    private func clustersOfOtherMetadata() -> Set<Int64> {
        let clusterSize = Int64(header.clusterSize)
        var clusters: Set<Int64> = []
        func mark(_ offset: UInt64, _ length: Int64) {
            guard length > 0 else { return }
            for cluster in (Int64(offset) / clusterSize)...((Int64(offset) + length - 1) / clusterSize) {
                clusters.insert(cluster)
            }
        }
        mark(0, clusterSize)
        mark(header.l1TableOffset, Int64(header.l1Size) * 8)
        for entry in l1 where entry & QCOW2Entry.offsetMask != 0 { mark(entry & QCOW2Entry.offsetMask, clusterSize) }
        if header.snapshotCount > 0 { mark(header.snapshotsOffset, Int64(max(snapshotTableLength, 1))) }
        return clusters
    }

    /// The clusters of the snapshots' L1 tables (for overlap checks).
    private func clustersOfSnapshotL1Tables() -> QCOW2ClusterRuns {
        let clusterSize = Int64(header.clusterSize)
        // (A check reads tables whose L1 table no image could hold.)
        return QCOW2ClusterRuns(snapshots.filter { $0.l1Size > 0 && $0.l1TableOffset < QCOW2Header.maxSize }.map { snapshot in
            let start = Int64(snapshot.l1TableOffset)
            return start / clusterSize...(start + Int64(snapshot.l1Size) * 8 - 1) / clusterSize
        })
    }

    /// Persistent dirty bitmaps are kept, but Strata does not track writes
    /// in them: flag each one in-use (inconsistent), as QEMU flags the
    /// bitmaps of an image it has open, so no tool trusts a stale bitmap.
    func markBitmapsInUse(file: BlockNode) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        guard let directory = bitmapDirectory else { return loop.makeSucceededVoidFuture() }
        var bytes = directory.bytes
        for entry in directory.entries {
            bytes[entry.position + 15] |= UInt8(QCOW2BitmapDirectory.Entry.inUseFlag)  // the big-endian flags' low byte
        }
        guard bytes != directory.bytes else { return loop.makeSucceededVoidFuture() }
        return QCOW2Driver.writeBytes(file, bytes, at: Int64(directory.offset)).map {
            self.bitmapDirectory?.bytes = bytes
        }
    }

    /// Sets every refcount to the references the metadata holds: what
    /// QEMU does on a read-write open of a dirty lazy-refcounts image, and
    /// what `check -r` does with counts it can fix in place.
    /// With `onlyLeaks`, only counts above the references are lowered
    /// (`qemu-img check -r leaks`); otherwise every count is set (`-r all`).
    /// Clusters it frees are punched out of the file, as QEMU frees them:
    /// the space a leak wasted comes back.
    public func repairRefcounts(file: BlockNode, onlyLeaks: Bool = false) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        return QCOW2Checker(driver: self, file: file).expectedRefcounts().flatMap { references in
            guard let refcounter = self.refcounter else { return loop.makeFailedFuture(BlockError.eperm) }
            var freed: [Int64] = []
            // Counts past the file and everything referenced are left as
            // they are, as qemu-img leaves them: it compares no further.
            let clusterSize = Int64(self.header.clusterSize)
            let limit = max((file.length + clusterSize - 1) / clusterSize, (references.keys.max() ?? -1) + 1)
            do {
                if !onlyLeaks {
                    for cluster in references.keys { try refcounter.ensureBlock(for: cluster) }
                }
                var tableIndexOf: [UInt64: Int] = [:]
                for (index, entry) in refcounter.table.enumerated() where entry != 0 {
                    tableIndexOf[entry & ~UInt64(511)] = tableIndexOf[entry & ~UInt64(511)] ?? index
                }
                for (offset, block) in refcounter.blocks {
                    guard let tableIndex = tableIndexOf[offset] else { continue }
                    for index in 0..<Int(refcounter.perBlock) {
                        let cluster = Int64(tableIndex) * refcounter.perBlock + Int64(index)
                        guard cluster < limit else { break }
                        let expected = UInt64(references[cluster] ?? 0)
                        let stored = QCOW2Refcounts.entry(block.bytes, index: index, bits: refcounter.bits)
                        guard stored != expected, !onlyLeaks || stored > expected else { continue }
                        QCOW2Refcounter.store(block.mutableBytes, index: index, bits: refcounter.bits, value: expected)
                        refcounter.dirtyBlocks.insert(offset)
                        // A repaired leak is free for the allocator again.
                        if expected == 0 {
                            refcounter.firstFreeCandidate = min(refcounter.firstFreeCandidate, cluster)
                            freed.append(cluster)
                        }
                    }
                }
            } catch {
                return loop.makeFailedFuture(error)
            }
            let promise = loop.makePromise(of: Void.self)
            self.writeBackMetadata { error in
                if let error { promise.fail(error) } else { promise.succeed(()) }
            }
            return promise.futureResult.flatMap { self.punch(freed, file: file) }
        }
    }

    /// Punches the runs of `clusters` inside the file out of it, one run
    /// after another. A file that cannot punch holes keeps the bytes, as
    /// QEMU keeps them: the refcounts are what counts.
    func punch(_ clusters: [Int64], file: BlockNode) -> EventLoopFuture<Void> {
        let clusterSize = Int64(header.clusterSize)
        var chain = file.eventLoop.makeSucceededVoidFuture()
        for run in QCOW2ClusterRuns(clusters.map { $0...$0 }).runs {
            let start = run.lowerBound * clusterSize
            let end = min((run.upperBound + 1) * clusterSize, file.length)
            guard start < end else { break }
            chain = chain.flatMap {
                let promise = file.eventLoop.makePromise(of: Void.self)
                file.discard(at: start, length: end - start, evenIfIgnored: true) { _ in promise.succeed(()) }
                return promise.futureResult
            }
        }
        return chain
    }

    /// After a check's repair left no corruptions: clears the dirty and
    /// corrupt bits, as `qemu-img check -r` does (the way to put an image
    /// the overlap checks flagged corrupt back into service).
    public func markConsistent(file: BlockNode) -> EventLoopFuture<Void> {
        clearFlags([.dirty, .corrupt], file: file)
    }

    /// After a check's repair left the refcounts consistent, though not
    /// everything else: clears the dirty bit (lazy refcounts need no
    /// repair on the next open).
    public func markClean(file: BlockNode) -> EventLoopFuture<Void> {
        clearFlags(.dirty, file: file)
    }

    /// Clears header bits and rewrites the header if any was set.
    func clearFlags(_ flags: QCOW2Header.IncompatibleFeatures, file: BlockNode) -> EventLoopFuture<Void> {
        guard !header.incompatibleFeatures.isDisjoint(with: flags) else { return file.eventLoop.makeSucceededVoidFuture() }
        header.incompatibleFeatures.subtract(flags)
        if flags.contains(.corrupt) { corruptMarking = nil }  // a later corruption marks it again
        return rewriteHeader(file: file)
    }

    /// A clean close: write back metadata, then clear the dirty bit.
    ///
    /// Not after a check's repair: only a repair that fixed everything
    /// clears it (`markConsistent`). qemu-img 7.2 clears it on close even
    /// when `-r leaks` gave up, leaving clusters in use counted 0: measured,
    /// its next write into a new cluster overwrote guest data there.
    ///
    /// It always ends after the last header write, even when the flush
    /// failed: a read that finds a corruption marks the image without
    /// waiting for that write, and the file must not close under it.
    public func prepareToClose(completion: @escaping BlockCompletion) {
        guard writable else { return completion(nil) }
        let loop = file.eventLoop
        flush { flushError in
            let cleared = flushError != nil || self.options.forRepair ? loop.makeSucceededVoidFuture()
                                                                      : self.clearFlags(.dirty, file: self.file)
            cleared.flatMap { self.lastHeaderWrite ?? loop.makeSucceededVoidFuture() }.whenComplete { result in
                if let flushError { return completion(flushError) }
                if case .failure(let error) = result { return completion(error as? BlockError ?? .eio) }
                completion(nil)
            }
        }
    }

    /// Writes the whole header cluster and syncs, after every
    /// header write asked for before it has ended: two in flight at once
    /// could land in either order, and one marking the image corrupt that
    /// still names the refcount table being replaced could land last.
    func rewriteHeader(file: BlockNode) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        let bytes: [UInt8]
        do { bytes = try header.serialize() } catch { return loop.makeFailedFuture(error) }
        // The whole cluster, as QEMU writes it: a header that shrank (an
        // extension dropped, a shorter backing name) leaves no old bytes.
        let clusterSize = header.clusterSize
        let previous = lastHeaderWrite ?? loop.makeSucceededVoidFuture()
        let write = previous.flatMapErrorThrowing { _ in }.flatMap {
            QCOW2Driver.writeBytes(file, bytes, at: 0, zeroFilledTo: clusterSize)
        }
        lastHeaderWrite = write
        headerWritesInFlight += 1
        write.whenComplete { _ in self.headerWritesInFlight -= 1 }
        node?.noteChangeOutsideRequests()
        return write
    }
}
