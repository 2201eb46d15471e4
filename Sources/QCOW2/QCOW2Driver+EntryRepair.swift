import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

extension QCOW2Driver {
    /// Writes table entries a check found wrong, as `qemu-img check -r`
    /// rewrites them: COPIED flags that disagree with their clusters'
    /// refcounts (`Report.copiedFixes` of a check run after the refcount
    /// repair), and misaligned entries that hold no data
    /// (`Report.preallocatedFixes`).
    ///
    /// Each table cluster with fixes is read, patched and written once, so
    /// a table full of bad entries costs one write, not one per entry.
    public func repairEntries(_ fixes: [QCOW2Checker.EntryFix], file: BlockNode) -> EventLoopFuture<Void> {
        let clusterSize = UInt64(header.clusterSize)
        if let overlap = firstOverlappingFix(fixes) {
            // qemu-img's overlap check stops its repair here the same way
            // (Strata writes none of the fixes; qemu-img those before it).
            let promise = file.eventLoop.makePromise(of: Void.self)
            markCorrupt("Preventing invalid write on metadata (overlaps with \(overlap.structure))") { error in
                promise.fail(error ?? .eio)
            }
            return promise.futureResult
        }
        let byCluster = Dictionary(grouping: fixes) { $0.entryOffset / clusterSize * clusterSize }
        var chain = file.eventLoop.makeSucceededVoidFuture()
        for (offset, fixes) in byCluster.sorted(by: { $0.key < $1.key }) {
            chain = chain.flatMap { self.rewrite(fixes, inClusterAt: offset, file: file) }
        }
        return chain
    }

    /// The structures each metadata cluster holds, by name (QEMU's names),
    /// built once for all fixes: the active L1 and L2 tables, the header,
    /// the refcount table and blocks, the snapshot table and the bitmap
    /// directory. Snapshots' L1 tables are looked up in their runs.
    private func metadataStructures() -> [Int64: Set<String>] {
        let clusterSize = Int64(header.clusterSize)
        var structures: [Int64: Set<String>] = [0: ["qcow2_header"]]
        func mark(_ offset: UInt64, _ length: Int64, _ name: String) {
            guard length > 0, offset < QCOW2Header.maxSize else { return }
            for cluster in Int64(offset) / clusterSize...(Int64(offset) + length - 1) / clusterSize {
                structures[cluster, default: []].insert(name)
            }
        }
        mark(header.l1TableOffset, Int64(l1.count) * 8, "active L1 table")
        for entry in l1 where entry & QCOW2Entry.offsetMask != 0 {
            mark(entry & QCOW2Entry.offsetMask, clusterSize, "active L2 table")
        }
        mark(header.refcountTableOffset, Int64(header.refcountTableClusters) * clusterSize, "refcount table")
        for entry in refcounter?.table ?? [] where entry & ~UInt64(511) != 0 {
            mark(entry & ~UInt64(511), clusterSize, "refcount block")
        }
        if header.snapshotCount > 0 { mark(header.snapshotsOffset, Int64(max(snapshotTableLength, 1)), "snapshot table") }
        if let directory = bitmapDirectory { mark(directory.offset, Int64(directory.bytes.count), "bitmap directory") }
        return structures
    }

    /// The first fix that would write into another structure, and that
    /// structure's name (QEMU's), or nil when every fix is safe to write.
    public func firstOverlappingFix(_ fixes: [QCOW2Checker.EntryFix]) -> (index: Int, structure: String)? {
        let structures = metadataStructures()
        for (index, fix) in fixes.enumerated() {
            if let structure = overlap(fix, structures: structures) { return (index, structure) }
        }
        return nil
    }

    /// What else the cluster a fix would write holds, or nil: an L1 entry
    /// may only land in the L1 table, an L2 entry only in L2 tables (an
    /// L1 entry naming the L1 table makes it both). Written, the fix would
    /// change what the other structure says.
    private func overlap(_ fix: QCOW2Checker.EntryFix, structures: [Int64: Set<String>]) -> String? {
        let cluster = Int64(fix.entryOffset) / Int64(header.clusterSize)
        let own = fix.l1Index != nil ? "active L1 table" : "active L2 table"
        if let other = structures[cluster]?.subtracting([own]).sorted().first { return other }
        if let refcounter, !refcounter.snapshotL1Clusters.isEmpty, refcounter.snapshotL1Clusters.contains(cluster) {
            return "inactive L1 table"
        }
        return nil
    }

    /// Writes the fixed entries of one table cluster in place and updates
    /// the copies held in memory. Only the sectors from the first fix to
    /// the last are written, as qemu-img writes entries: the rest of the
    /// cluster may be a hole in the file, and stays one.
    private func rewrite(_ fixes: [QCOW2Checker.EntryFix], inClusterAt offset: UInt64,
                         file: BlockNode) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        let entries = fixes.map(\.entryOffset)
        let start = max(offset, entries.min()! / 512 * 512)
        // The file may end inside the cluster after the table's last entry.
        let end = min(offset + UInt64(header.clusterSize), (entries.max()! + 8 + 511) / 512 * 512, UInt64(file.length))
        guard start < UInt64(file.length), entries.max()! + 8 <= end else {
            return loop.makeFailedFuture(BlockError(errno: EIO, "Table entry at 0x\(String(offset, radix: 16)) lies past the end of the image"))
        }
        return QCOW2Driver.readBytes(file, at: Int64(start), count: Int(end - start)).flatMap { bytes in
            var patched = bytes
            for fix in fixes {
                let at = Int(fix.entryOffset - start)
                for index in 0..<8 { patched[at + index] = UInt8(truncatingIfNeeded: fix.entry >> UInt64(56 - 8 * index)) }
            }
            return QCOW2Driver.writeBytes(file, patched, at: Int64(start)).map { fixes.forEach(self.applyInMemory) }
        }
    }

    private func applyInMemory(_ fix: QCOW2Checker.EntryFix) {
        if let index = fix.l1Index {
            if index < l1.count { l1[index] = fix.entry }
        } else if let offset = fix.l2Table {
            for table in [dirtyL2[offset], l2Cache.get(offset)].compactMap({ $0 }) {
                table.setEntry(fix.slot, fix.entry)
            }
        }
    }
}
