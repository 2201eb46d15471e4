import BlockLayer
import NIOCore

extension QCOW2Driver {
    /// `qemu-img check -r all`'s answer to a refcount structure that could
    /// not be loaded (`refcountDamage`): counts every cluster's references
    /// from the other metadata, writes new blocks and a new table into free
    /// clusters (FUA), and only then points the header at the new table and
    /// loads it as a read-write open does. The old structure's clusters end
    /// up free; they are returned, with the count each had and the
    /// references left to it, for the messages qemu-img prints as it frees
    /// them (its rebuild counts them at first, then repairs them as leaks).
    public func rebuildRefcounts(file: BlockNode) -> EventLoopFuture<[QCOW2Checker.RefcountMismatch]> {
        let loop = file.eventLoop
        let clusterSize = Int64(header.clusterSize)
        let bits = header.refcountBits
        var freed: [QCOW2Checker.RefcountMismatch] = []
        return QCOW2Checker(driver: self, file: file).referencesForRebuild().flatMapThrowing { found in
            for (cluster, count) in found.all where count > found.references[cluster] ?? 0 {
                freed.append(.init(cluster: cluster, stored: UInt64(count),
                                   referenced: UInt64(found.references[cluster] ?? 0)))
            }
            freed.sort { $0.cluster < $1.cluster }
            return try QCOW2RefcountRebuild(references: found.references, occupied: found.occupied,
                                            clusterSize: clusterSize, refcountBits: bits)
        }.flatMap { plan in
            var writes = loop.makeSucceededVoidFuture()
            for (cluster, bytes) in plan.blockBytes.sorted(by: { $0.key < $1.key }) {
                writes = writes.flatMap { QCOW2Driver.writeBytes(file, bytes, at: cluster * clusterSize) }
            }
            return writes.flatMap {
                QCOW2Driver.writeBytes(file, plan.tableBytes, at: plan.tableStart * clusterSize)
            }.flatMap {
                self.header.refcountTableOffset = UInt64(plan.tableStart * clusterSize)
                self.header.refcountTableClusters = UInt32(plan.tableClusters)
                return self.rewriteHeader(file: file)
            }.flatMap {
                self.refcountDamage = nil
                return self.prepareForWriting(file: file)
            }.flatMap {
                // Placed clear of the old structure, the new one leaves it
                // all free: punched out, as qemu-img frees it.
                self.punch(freed.filter { $0.referenced == 0 }.map(\.cluster), file: file)
            }.map { freed }
        }
    }
}
