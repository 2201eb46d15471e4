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
            let byCluster = Dictionary(grouping: report.copiedFixes) { $0.entryOffset / clusterSize * clusterSize }
            var chain = file.eventLoop.makeSucceededVoidFuture()
            for (offset, fixes) in byCluster.sorted(by: { $0.key < $1.key }) {
                chain = chain.flatMap { self.rewrite(fixes, inClusterAt: offset, file: file) }
            }
            return chain.map { report.copiedFixes.count }
        }
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
