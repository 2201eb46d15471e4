import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// `qemu-img check` for qcow2: rebuilds every cluster's reference count
/// from the metadata (header, L1/L2 tables, refcount structures, snapshots,
/// bitmaps) and compares it with the stored refcounts.
public final class QCOW2Checker {
    public struct Report: Sendable {
        public var corruptions = 0
        public var leaks = 0
        public var checkErrors = 0
        public var messages: [String] = []
        public var allocatedClusters = 0
        public var compressedClusters = 0
        public var fragmentedClusters = 0
        public var totalClusters = 0
        public var imageEndOffset: Int64 = 0
        /// Active L1 and L2 entries whose COPIED flag disagrees with their
        /// cluster's refcount, with the value each should have.
        public var copiedFixes: [EntryFix] = []
        /// A refcount block shares its cluster, or a cluster in use has
        /// refcount 0 (its block may be missing): as qemu-img, `-r all`
        /// rebuilds the refcount structure, and `-r leaks` gives up.
        public var refcountsNeedRebuild = false
        /// Snapshot table entries without the extra data version 3 asks
        /// for; `-r all` writes the table again (see
        /// `QCOW2Driver.rewriteSnapshotTable`).
        public var incompleteSnapshots = 0
        /// Snapshot table entries whose extra data `-r all` cut to QEMU's
        /// limit as it read the table; it writes the table again too.
        public var droppedSnapshotExtraData = 0
        /// Clusters whose stored refcount differs from the references
        /// counted, in cluster order (each is also a message).
        public var mismatches: [RefcountMismatch] = []
        /// Where the COPIED check's messages start in `messages`: a
        /// repairing check (`qemu-img check -r`) judges COPIED flags only
        /// after the refcounts are repaired, so it prints what comes before
        /// and replaces what follows.
        public var copiedMessagesStart = 0
        /// Where the walk over the metadata starts in `messages`, after
        /// the snapshot table's entries.
        public var walkMessagesStart = 0
        /// Where the refcount comparison's messages start in `messages`,
        /// after the walk over the metadata and the refcount structure's
        /// own checks.
        public var mismatchMessagesStart = 0
        /// Refcount blocks past the end of the file, with the index of each
        /// one's message: qemu-img's `-r all` tries to grow the file over
        /// them (see `CheckRepairPass`).
        public var blocksOutsideImage: [(block: Int, offset: UInt64, messageIndex: Int)] = []
        /// Misaligned entries that hold no data, each with the index of its
        /// message, in the order the walk met them (an L2 table two L1
        /// tables share, twice): `-r all` rewrites them as entries without
        /// a cluster, as qemu-img does.
        /// The messages counting the entry's cluster added (past the end
        /// of the file, an overflow) follow it, `countingMessages` of them.
        public var preallocatedFixes: [(fix: EntryFix, messageIndex: Int, countingMessages: Int)] = []

        /// Corruptions found before the COPIED check: everything the
        /// refcount comparison and the walk over the metadata count, but
        /// the snapshot table's entries.
        public var refcountCorruptions: Int {
            corruptions - incompleteSnapshots - droppedSnapshotExtraData - copiedFixes.count
        }
    }

    /// A cluster whose stored refcount is not the references counted.
    public struct RefcountMismatch: Sendable {
        public var cluster: Int64
        public var stored: UInt64
        public var referenced: UInt64

        /// The check's line, or the repair's when `repairing`.
        public func message(repairing: Bool = false) -> String {
            let what = repairing ? "Repairing" : stored < referenced ? "ERROR" : "Leaked"
            return "\(what) cluster \(cluster) refcount=\(stored) reference=\(referenced)"
        }
    }

    /// A table entry to rewrite: one of the active tables' with COPIED set
    /// or cleared, or a misaligned one without its cluster.
    public struct EntryFix: Sendable {
        /// Where the entry lies in the image file.
        public var entryOffset: UInt64
        /// The entry as it should be.
        public var entry: UInt64
        /// The L1 index, for an L1 entry.
        public var l1Index: Int?
        /// The L2 table and slot, for an L2 entry.
        public var l2Table: UInt64?
        public var slot: Int
    }

    let file: BlockNode
    let header: QCOW2Header
    let activeL1: [UInt64]
    let snapshots: [QCOW2Snapshot]
    let droppedExtraData: [QCOW2SnapshotTable.DroppedExtraData]
    let overhangingSnapshots: Int
    let externalData: Bool
    let snapshotTableLength: Int
    let bitmapDirectory: QCOW2BitmapDirectory?
    /// The guest size in whole sectors, as the driver reads it.
    let guestSize: Int64
    var references: [Int64: Int] = [:]
    /// Refcount blocks named by table entries with reserved bits: not
    /// counted, as qemu-img counts, but in use until a rebuild replaces them.
    var uncountedBlocks: Set<Int64> = []
    /// Refcounts as stored in the image (known once they are compared).
    var stored: [Int64: UInt64] = [:]
    /// The refcount table entries (indices) whose block cannot be read at
    /// all, misaligned or beyond any offset a read can reach: qemu-img
    /// cannot get their clusters' refcounts, and says so for each one.
    /// Looked up by index, as a hostile table may have a million.
    var unreadableBlocks: Set<Int> = []
    /// The offsets of the misaligned ones among them, by index.
    var misalignedBlocks: [Int: UInt64] = [:]
    /// QEMU tells of a corrupt image once.
    var corruptionSignalled = false
    /// Opened for a repair, the image would be marked corrupt where a
    /// read-only check only calls it corrupt (qemu's two wordings).
    let openedForRepair: Bool
    var report = Report()
    /// Whether messages are kept in the report. A repair that only needs
    /// the references (`expectedRefcounts`, `referencesForRebuild`) keeps
    /// none: a hostile image whose L1 table names one L2 table of bad
    /// entries millions of times would otherwise fill memory with lines
    /// nobody reads (qemu-img prints them as it goes).
    private var keepsMessages = true

    /// Adds a line to the report's messages, unless none are kept.
    func note(_ message: @autoclosure () -> String) {
        if keepsMessages { report.messages.append(message()) }
    }
    var clusterSize: Int64 { Int64(header.clusterSize) }
    /// The clusters one refcount block counts.
    var clustersPerBlock: Int64 { Int64(header.clusterSize * 8 / header.refcountBits) }

    public init(driver: QCOW2Driver, file: BlockNode) {
        self.file = file
        header = driver.header
        activeL1 = driver.options.snapshot == nil ? driver.l1 : []
        snapshots = driver.snapshots
        droppedExtraData = driver.droppedSnapshotExtraData
        overhangingSnapshots = driver.overhangingSnapshots
        externalData = header.incompatibleFeatures.contains(.externalDataFile)
        snapshotTableLength = driver.snapshotTableLength
        bitmapDirectory = driver.bitmapDirectory
        guestSize = driver.length
        openedForRepair = driver.options.forRepair
    }

    /// Counts one reference to every cluster of `[offset, offset + length)`.
    func reference(_ offset: UInt64, length: Int64) {
        guard length > 0 else { return }
        // Ending a cluster or more past the end of the file (a cluster that
        // starts right at the end, say) is an error, and not counted
        // (qemu-img's test and words): a hostile offset must not make the
        // comparison walk refcounts up to 2^61. From 2^61 on (only a
        // snapshot's L1 table gets there: the rest are masked or checked on
        // open) it is past any file; no check reads a region past 2^63.
        if offset >= QCOW2Header.maxSize || Int64(offset) + length - file.length >= clusterSize {
            report.corruptions += 1
            note("ERROR: counting reference for region exceeding the end of the file by one "
                + "cluster or more: offset 0x\(String(offset, radix: 16)) size 0x\(String(length, radix: 16))")
            return
        }
        let first = Int64(offset) / clusterSize
        let last = (Int64(offset) + length - 1) / clusterSize
        for cluster in first...last {
            // Counted no higher than a refcount can hold, as qemu-img counts:
            // a repair writing more would wrap the field (2 in 1 bit is 0)
            // and free a cluster in use.
            guard references[cluster, default: 0] < maxReference else {
                report.corruptions += 1
                note("""
                    ERROR: overflow cluster offset=0x\(String(cluster * clusterSize, radix: 16))
                    Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing
                    """)
                continue
            }
            references[cluster, default: 0] += 1
        }
    }

    /// The highest refcount the image's refcount width holds.
    private var maxReference: Int {
        header.refcountBits >= 63 ? Int.max : (1 << header.refcountBits) - 1
    }

    /// Reads metadata; what lies past the end of the file reads as zeroes,
    /// as through QEMU's file driver, so a table there is reported (by
    /// `reference`) and checked as empty instead of failing the check.
    func read(_ offset: UInt64, _ count: Int) -> EventLoopFuture<[UInt8]> {
        QCOW2Driver.readPaddingWithZeroes(file, at: offset, count: count)
    }

    /// Only the references every cluster should have (for repairs).
    public func expectedRefcounts() -> EventLoopFuture<[Int64: Int]> {
        keepsMessages = false
        return collect().flatMap { self.countRefcountBlocks() }.map { self.references }
    }

    /// What a refcount rebuild needs: the references of everything but the
    /// refcount structure, those of every cluster in use now, the old table
    /// and blocks included, and the clusters the rebuild must not overwrite
    /// (those, and blocks named by entries with reserved bits).
    public func referencesForRebuild()
        -> EventLoopFuture<(references: [Int64: Int], all: [Int64: Int], occupied: Set<Int64>)> {
        keepsMessages = false
        return collect(countingRefcountTable: false).flatMap { () -> EventLoopFuture<[Int64: Int]> in
            let references = self.references
            self.referenceRefcountTable()
            return self.countRefcountBlocks().map { references }
        }.map { references in (references, self.references, Set(self.references.keys).union(self.uncountedBlocks)) }
    }

    private func referenceRefcountTable() {
        reference(header.refcountTableOffset, length: Int64(header.refcountTableClusters) * clusterSize)
    }

    /// Counts the refcount blocks themselves as referenced.
    private func countRefcountBlocks() -> EventLoopFuture<Void> {
        let tableBytes = Int(header.refcountTableClusters) * header.clusterSize
        return read(header.refcountTableOffset, tableBytes).map { table in
            let reader = BigEndianReader(table)
            for block in 0..<(table.count / 8) {
                let entry = reader.u64(at: block * 8)
                let offset = entry & ~UInt64(511)
                // An entry with reserved bits set is not counted (see
                // compareRefcounts), but its block is not free either.
                guard offset != 0, offset < QCOW2Header.maxSize else { continue }
                // A misaligned one is no block at all (see countBlock).
                guard offset % UInt64(self.clusterSize) == 0 else { continue }
                if entry & 511 == 0 {
                    self.reference(offset, length: self.clusterSize)
                } else {
                    self.uncountedBlocks.insert(Int64(offset) / self.clusterSize)
                }
            }
        }
    }

    public func run() -> EventLoopFuture<Report> {
        checkSnapshotEntries()
        report.walkMessagesStart = report.messages.count
        return collect().flatMap { self.compareRefcounts() }.flatMap { self.checkCopied() }.map { self.report }
    }

    /// Version 3 entries need 16 bytes of extra data at least, as qemu-img
    /// checks: reported first, as qemu-img reports them, after what `-r all`
    /// cut from the table as it read it. (The entries it dropped from the
    /// end are fixed at once, as the header counts the rest: no corruption
    /// is left of them; see `CheckRepairPass`.)
    private func checkSnapshotEntries() {
        for dropped in droppedExtraData {
            report.corruptions += 1
            report.droppedSnapshotExtraData += 1
            note("Discarding too much extra metadata in snapshot table entry \(dropped.entry) "
                                   + "(\(dropped.size) > \(QCOW2SnapshotTable.maxExtraData))")
        }
        if overhangingSnapshots > 0 {
            note("Discarding \(overhangingSnapshots) overhanging snapshots (snapshot table is too big)")
        }
        guard header.version >= 3 else { return }
        for (index, snapshot) in snapshots.enumerated() where snapshot.extraDataSize < 16 {
            report.corruptions += 1
            report.incompleteSnapshots += 1
            note("ERROR snapshot table entry \(index) is incomplete")
        }
    }

    /// Walks all metadata, counting references, in qemu-img's order (which
    /// decides where its messages fall, and which reference overflows a
    /// narrow refcount): the header, the active tables, the snapshots',
    /// the snapshot table, the refcount table, the bitmaps.
    private func collect(countingRefcountTable: Bool = true) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        reference(0, length: clusterSize)
        var tables: [(l1: [UInt64]?, offset: UInt64, size: UInt32, active: Bool)] = []
        if !activeL1.isEmpty || header.l1Size == 0 {
            tables.append((activeL1, header.l1TableOffset, header.l1Size, true))
        } else {
            tables.append((nil, header.l1TableOffset, header.l1Size, true))
        }
        var work = loop.makeSucceededVoidFuture()
        for table in tables {
            work = work.flatMap { self.checkL1(table.l1, offset: table.offset, size: table.size, active: table.active) }
        }
        // A snapshot whose L1 table cannot be right is a corruption, and its
        // tables are not walked, as qemu-img judges it.
        for snapshot in snapshots {
            work = work.flatMap {
                let entry = "ERROR snapshot \(snapshot.id) (\(snapshot.name))"
                if snapshot.l1TableOffset % UInt64(self.clusterSize) != 0 {
                    self.report.corruptions += 1
                    self.note("\(entry) l1_offset=0x\(String(snapshot.l1TableOffset, radix: 16)): "
                        + "L1 table is not cluster aligned; snapshot table entry corrupted")
                    return loop.makeSucceededVoidFuture()
                }
                if UInt64(snapshot.l1Size) * 8 > QCOW2Header.maxL1Bytes {
                    self.report.corruptions += 1
                    self.note("\(entry) l1_size=0x\(String(snapshot.l1Size, radix: 16)): "
                        + "L1 table is too large; snapshot table entry corrupted")
                    return loop.makeSucceededVoidFuture()
                }
                return self.checkL1(nil, offset: snapshot.l1TableOffset, size: snapshot.l1Size, active: false)
            }
        }
        return work.flatMap {
            if self.header.snapshotCount > 0 {
                self.reference(self.header.snapshotsOffset, length: Int64(max(self.snapshotTableLength, 1)))
            }
            if countingRefcountTable { self.referenceRefcountTable() }
            return self.checkBitmaps()
        }
    }

    private func checkL1(_ known: [UInt64]?, offset: UInt64, size: UInt32, active: Bool) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        guard size > 0 else { return loop.makeSucceededVoidFuture() }
        reference(offset, length: Int64(size) * 8)
        return loadL1(known, offset: offset, size: size).flatMap { l1 in
            self.walkL1(l1, from: 0, active: active)
        }
    }

    /// L1 entries checked per step of `walkL1`.
    static let l1EntriesPerStep = 8192

    /// Checks the L1 entries from `start` on, each one and then its L2
    /// table, as qemu-img does (so messages and narrow-refcount overflows
    /// fall where its do). A step at a time: a hostile L1 table of 4M
    /// entries that all name one L2 table queues 8192 checks, not 4M.
    private func walkL1(_ l1: [UInt64], from start: Int, active: Bool) -> EventLoopFuture<Void> {
        let end = min(start + Self.l1EntriesPerStep, l1.count)
        var chain = file.eventLoop.makeSucceededVoidFuture()
        // Any bit set makes the entry a table to qemu-img, at offset 0 too
        // (it then reads the header as one).
        for index in start..<end where l1[index] != 0 {
            chain = chain.flatMap { self.checkL1Entry(l1[index], index: index, active: active) }
        }
        guard end < l1.count else { return chain }
        return chain.flatMap { self.walkL1(l1, from: end, active: active) }
    }

    private func checkL1Entry(_ entry: UInt64, index: Int, active: Bool) -> EventLoopFuture<Void> {
        if entry & QCOW2Entry.l1ReservedMask != 0 {
            report.corruptions += 1
            note("ERROR found L1 entry with reserved bits set: \(String(entry, radix: 16))")
        }
        let l2Offset = entry & QCOW2Entry.offsetMask
        // Misplaced, the table still counts for the clusters it overlaps
        // and its entries are checked, as qemu-img does: a repair must not
        // free what they hold.
        reference(l2Offset, length: clusterSize)
        if l2Offset % UInt64(clusterSize) != 0 {
            report.corruptions += 1
            note("ERROR l2_offset=\(String(l2Offset, radix: 16)): Table is not cluster aligned; L1 entry corrupted")
        }
        return checkL2(at: l2Offset, firstCluster: index * header.l2Entries, active: active)
    }

    /// An L1 table: the copy in memory when there is one, else from the file.
    private func loadL1(_ known: [UInt64]?, offset: UInt64, size: UInt32) -> EventLoopFuture<[UInt64]> {
        if let known { return file.eventLoop.makeSucceededFuture(known) }
        return read(offset, Int(size) * 8).map { bytes in
            let reader = BigEndianReader(bytes)
            return (0..<Int(size)).map { reader.u64(at: $0 * 8) }
        }
    }

    /// A table that starts past the end of the file is reported (by
    /// `reference`) and has no entries; one the file ends inside is read
    /// with zeroes after the end, as QEMU reads it: its entries count, or a
    /// repair would free the clusters they map.
    private func checkL2(at offset: UInt64, firstCluster: Int, active: Bool) -> EventLoopFuture<Void> {
        guard Int64(offset) < file.length else { return file.eventLoop.makeSucceededVoidFuture() }
        return read(offset, header.clusterSize).map { bytes in
            let reader = BigEndianReader(bytes)
            var previousHost: UInt64?
            for index in 0..<self.header.l2Entries {
                let entry = reader.u64(at: index * self.header.l2EntrySize)
                if entry & QCOW2Entry.compressed == 0, entry & QCOW2Entry.l2ReservedMask != 0 {
                    // Reported first, in qemu-img's words; the entry is
                    // checked and counted all the same.
                    self.report.corruptions += 1
                    self.note("ERROR found l2 entry with reserved bits set: \(String(entry, radix: 16))")
                }
                if entry & QCOW2Entry.compressed != 0 {
                    guard case .compressed(let host, let size)? = QCOW2Entry.mapping(
                        entry: entry, bitmap: nil, subcluster: 0, clusterBits: self.header.clusterBits) else { continue }
                    // qemu-img's checks of compressed entries, in its order.
                    if entry & QCOW2Entry.copied != 0 {
                        self.report.corruptions += 1
                        self.note("ERROR: coffset=0x\(String(host, radix: 16)): copied flag must never be set for compressed clusters")
                    }
                    if self.header.hasExtendedL2, case let bitmap = reader.u64(at: index * self.header.l2EntrySize + 8), bitmap != 0 {
                        // Not counted, as qemu-img does not count it.
                        self.report.corruptions += 1
                        // Printed without COPIED, which qemu-img has reported and cleared by now.
                        self.note("ERROR compressed cluster \(firstCluster + index) with non-zero subcluster allocation bitmap, entry=0x\(String(entry & ~QCOW2Entry.copied, radix: 16))")
                        continue
                    }
                    self.reference(host, length: Int64(size))
                    if active {
                        // Fragmented too, as qemu-img counts them: reading
                        // one means reading sectors its neighbours share.
                        self.report.allocatedClusters += 1
                        self.report.compressedClusters += 1
                        self.report.fragmentedClusters += 1
                    }
                    continue
                }
                let host = entry & QCOW2Entry.offsetMask
                let allocated = host != 0 || (self.externalData && entry & QCOW2Entry.copied != 0)
                // Subclusters: one allocated and zero at once, or allocated
                // in a cluster without one, are corruptions (no repair
                // mends them), in qemu-img's words.
                let bitmap = self.header.hasExtendedL2 ? reader.u64(at: index * self.header.l2EntrySize + 8) : 0
                guard allocated else {
                    if bitmap & 0xffff_ffff != 0 {
                        self.report.corruptions += 1
                        self.note("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                    }
                    continue
                }
                if (bitmap >> 32) & bitmap & 0xffff_ffff != 0 {
                    self.report.corruptions += 1
                    self.note("ERROR offset=\(String(host, radix: 16)): Allocated cluster has corrupted subcluster allocation bitmap")
                }
                // A misaligned entry `-r all` rewrites, with its message.
                var preallocatedFix: (fix: EntryFix, messageIndex: Int)?
                if host % UInt64(self.clusterSize) != 0 {
                    // Counted all the same, as qemu-img counts it (see checkL1);
                    // named as qemu-img names it, by whether it holds data.
                    let holdsData = self.header.hasExtendedL2 ? bitmap & 0xffff_ffff != 0 : entry & QCOW2Entry.zeroFlag == 0
                    self.report.corruptions += 1
                    if !holdsData, self.keepsMessages {
                        // (A repair that keeps no messages needs no fixes.)
                        // Nothing is lost without the cluster: qemu-img's
                        // repair makes the entry read as zeroes (with
                        // extended L2, as its zero bits say).
                        let fix = EntryFix(entryOffset: offset + UInt64(index * self.header.l2EntrySize),
                                           entry: self.header.hasExtendedL2 ? 0 : QCOW2Entry.zeroFlag,
                                           l1Index: nil, l2Table: offset, slot: index)
                        preallocatedFix = (fix, self.report.messages.count)
                    }
                    self.note("ERROR offset=\(String(host, radix: 16)): "
                        + (holdsData ? "Data" : "Preallocated") + " cluster is not properly aligned; L2 entry corrupted.")
                }
                if active {
                    self.report.allocatedClusters += 1
                    if let previous = previousHost, previous + UInt64(self.clusterSize) != host {
                        self.report.fragmentedClusters += 1
                    }
                    previousHost = host
                }
                let before = self.report.messages.count
                if !self.externalData { self.reference(host, length: self.clusterSize) }
                if let (fix, messageIndex) = preallocatedFix {
                    self.report.preallocatedFixes.append((fix, messageIndex, self.report.messages.count - before))
                }
            }
        }
    }

    /// The bitmap directory, each bitmap's table and the clusters it
    /// names. The directory was checked on open, as QEMU checks it, so a
    /// table is at most 512 MiB of bitmap; one named twice is read once.
    private func checkBitmaps() -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        guard let directory = bitmapDirectory else { return loop.makeSucceededVoidFuture() }
        reference(directory.offset, length: Int64(directory.bytes.count))
        var chain = loop.makeSucceededVoidFuture()
        var tables: [UInt64: EventLoopFuture<[UInt64]>] = [:]
        for bitmap in directory.entries {
            let (tableOffset, tableSize) = (bitmap.tableOffset, bitmap.tableSize)
            reference(tableOffset, length: Int64(tableSize) * 8)
            // Past the end of the file a table reads as zeroes (no
            // clusters named), as in QEMU: only one starting inside it is
            // read. (Offsets past 2^63 come only with bitmaps in use.)
            guard tableOffset < UInt64(file.length) else { continue }
            // Only the entries the file holds (a last one cut short filled
            // out): zeroes past it name nothing.
            let inFile = min(tableSize, Int(min(UInt64(file.length) - tableOffset, 1 << 40) + 7) / 8)
            let table = tables[tableOffset] ?? chain.flatMap {
                self.read(tableOffset, inFile * 8).map { bytes in
                    let entries = BigEndianReader(bytes)
                    return (0..<inFile).map { entries.u64(at: $0 * 8) & QCOW2Entry.offsetMask }.filter { $0 != 0 }
                }
            }
            tables[tableOffset] = table
            chain = chain.flatMap {
                table.map { offsets in
                    for offset in offsets { self.reference(offset, length: self.clusterSize) }
                }
            }
        }
        return chain
    }

    /// QEMU's OFLAG_COPIED check: in the active tables, COPIED must be set
    /// exactly where the L2 table or data cluster has refcount 1 (always,
    /// for data in an external data file). Each mismatch is a corruption.
    private func checkCopied() -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        report.copiedMessagesStart = report.messages.count
        guard header.l1Size > 0 else { return loop.makeSucceededVoidFuture() }
        let known = activeL1.isEmpty ? nil : activeL1
        return loadL1(known, offset: header.l1TableOffset, size: header.l1Size).flatMap { l1 in
            var chain = loop.makeSucceededVoidFuture()
            for (index, entry) in l1.enumerated() {
                let l2Offset = entry & QCOW2Entry.offsetMask
                // A misaligned table is judged by the cluster it starts in,
                // and its entries are read from where it starts, as qemu-img
                // reads them.
                guard l2Offset != 0 else { continue }
                let refcount = self.stored[Int64(l2Offset) / self.clusterSize] ?? 0
                // A refcount qemu-img cannot get is skipped without a word.
                if self.refcountReadable(Int64(l2Offset) / self.clusterSize),
                   (refcount == 1) != (entry & QCOW2Entry.copied != 0) {
                    self.report.corruptions += 1
                    self.note("ERROR OFLAG_COPIED L2 cluster: l1_index=\(index) l1_entry=\(String(entry, radix: 16)) refcount=\(refcount)")
                    self.report.copiedFixes.append(EntryFix(
                        entryOffset: self.header.l1TableOffset + UInt64(index * 8),
                        entry: refcount == 1 ? entry | QCOW2Entry.copied : entry & ~QCOW2Entry.copied,
                        l1Index: index, l2Table: nil, slot: index))
                }
                guard Int64(l2Offset) < self.file.length else { continue }
                chain = chain.flatMap { self.checkCopied(inL2At: l2Offset) }
            }
            return chain
        }
    }

    private func checkCopied(inL2At offset: UInt64) -> EventLoopFuture<Void> {
        read(offset, header.clusterSize).map { bytes in
            let reader = BigEndianReader(bytes)
            for slot in 0..<self.header.l2Entries {
                let entry = reader.u64(at: slot * self.header.l2EntrySize)
                guard entry & QCOW2Entry.compressed == 0 else { continue }
                let host = entry & QCOW2Entry.offsetMask
                let refcount: UInt64
                if self.externalData {
                    guard host != 0 || entry & QCOW2Entry.copied != 0 else { continue }
                    refcount = 1
                } else {
                    // A misaligned entry is judged by the cluster its offset
                    // falls in, as qemu-img judges it.
                    guard host != 0, self.refcountReadable(Int64(host) / self.clusterSize) else { continue }
                    refcount = self.stored[Int64(host) / self.clusterSize] ?? 0
                }
                guard (refcount == 1) != (entry & QCOW2Entry.copied != 0) else { continue }
                self.report.corruptions += 1
                self.note("ERROR OFLAG_COPIED data cluster: l2_entry=\(String(entry, radix: 16)) refcount=\(refcount)")
                self.report.copiedFixes.append(EntryFix(
                    entryOffset: offset + UInt64(slot * self.header.l2EntrySize),
                    entry: refcount == 1 ? entry | QCOW2Entry.copied : entry & ~QCOW2Entry.copied,
                    l1Index: nil, l2Table: offset, slot: slot))
            }
        }
    }
}
