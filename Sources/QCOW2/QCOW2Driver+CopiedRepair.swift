import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

extension QCOW2Driver {
    /// The rest of `qemu-img check -r all` after refcounts are repaired: sets
    /// or clears every COPIED flag of the active tables that disagrees with
    /// its cluster's refcount. Returns how many entries were rewritten.
    ///
    /// Each table cluster with fixes is read, patched and written once, so
    /// a table full of bad entries costs one write, not one per entry.
    public func repairCopiedFlags(file: BlockNode) -> EventLoopFuture<Int> {
        QCOW2Checker(driver: self, file: file).run().flatMap { report in
            let clusterSize = UInt64(self.header.clusterSize)
            if let overlap = report.copiedFixes.lazy.compactMap(self.overlap).first {
                // qemu-img's overlap check stops its repair here the same way.
                let promise = file.eventLoop.makePromise(of: Int.self)
                self.markCorrupt("Preventing invalid write on metadata (overlaps with \(overlap))") { error in
                    promise.fail(error ?? .eio)
                }
                return promise.futureResult
            }
            let byCluster = Dictionary(grouping: report.copiedFixes) { $0.entryOffset / clusterSize * clusterSize }
            var chain = file.eventLoop.makeSucceededVoidFuture()
            for (offset, fixes) in byCluster.sorted(by: { $0.key < $1.key }) {
                chain = chain.flatMap { self.rewrite(fixes, inClusterAt: offset, file: file) }
            }
            return chain.map { report.copiedFixes.count }
        }
    }

    /// What else the cluster a fix would write holds, or nil: an L1 entry
    /// must not land in an L2 table (an L1 entry naming the L1 table makes
    /// it one), nor an L2 entry in the L1 table or other metadata. Written,
    /// the fix would change what the other structure says.
    private func overlap(_ fix: QCOW2Checker.CopiedFix) -> String? {
        let clusterSize = Int64(header.clusterSize)
        let cluster = Int64(fix.entryOffset) / clusterSize
        let l1First = Int64(header.l1TableOffset) / clusterSize
        let l1Last = (Int64(header.l1TableOffset) + Int64(l1.count) * 8 - 1) / clusterSize
        if fix.l1Index != nil {
            let l2Tables = l1.lazy.map { Int64($0 & QCOW2Entry.offsetMask) / clusterSize }
            return l2Tables.contains(cluster) ? "active L2 table" : nil
        }
        if !l1.isEmpty, (l1First...l1Last).contains(cluster) { return "active L1 table" }
        if cluster == 0 { return "qcow2_header" }
        let refcountTable = Int64(header.refcountTableOffset) / clusterSize
        if (refcountTable..<refcountTable + Int64(header.refcountTableClusters)).contains(cluster) { return "refcount table" }
        if let refcounter, refcounter.table.contains(where: { Int64($0 & ~UInt64(511)) / clusterSize == cluster && $0 != 0 }) {
            return "refcount block"
        }
        if let refcounter, !refcounter.snapshotL1Clusters.isEmpty, refcounter.snapshotL1Clusters.contains(cluster) {
            return "inactive L1 table"
        }
        if header.snapshotCount > 0, case let first = Int64(header.snapshotsOffset) / clusterSize,
           (first...(Int64(header.snapshotsOffset) + Int64(max(snapshotTableLength, 1)) - 1) / clusterSize).contains(cluster) {
            return "snapshot table"
        }
        return nil
    }

    /// Writes the fixed entries of one table cluster in place and updates
    /// the copies held in memory.
    private func rewrite(_ fixes: [QCOW2Checker.CopiedFix], inClusterAt offset: UInt64,
                         file: BlockNode) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        // The file may end inside the cluster after the table's last entry.
        let count = Int(min(Int64(header.clusterSize), file.length - Int64(offset)))
        guard count > 0, fixes.allSatisfy({ $0.entryOffset - offset + 8 <= UInt64(count) }) else {
            return loop.makeFailedFuture(BlockError(errno: EIO, "Table entry at 0x\(String(offset, radix: 16)) lies past the end of the image"))
        }
        return QCOW2Driver.readBytes(file, at: Int64(offset), count: count).flatMap { bytes in
            var patched = bytes
            for fix in fixes {
                let at = Int(fix.entryOffset - offset)
                for index in 0..<8 { patched[at + index] = UInt8(truncatingIfNeeded: fix.entry >> UInt64(56 - 8 * index)) }
            }
            return QCOW2Driver.writeBytes(file, patched, at: Int64(offset)).map { fixes.forEach(self.applyInMemory) }
        }
    }

    private func applyInMemory(_ fix: QCOW2Checker.CopiedFix) {
        if let index = fix.l1Index {
            if index < l1.count { l1[index] = fix.entry }
        } else if let offset = fix.l2Table {
            for table in [dirtyL2[offset], l2Cache.get(offset)].compactMap({ $0 }) {
                table.setEntry(fix.slot, fix.entry)
            }
        }
    }
}
