import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

extension QCOW2Driver {
    /// `qemu-img check -r all` for snapshot table entries left incomplete
    /// (version 3 entries without the 16 bytes of extra data, as QEMU
    /// before 4.2 wrote them) or with their extra data cut to QEMU's limit
    /// as they were read: the table is written again, as QEMU writes
    /// it, to new clusters; then the header names it, then the old clusters
    /// are freed. A crash on the way leaves the old table named, or the new
    /// one, and at worst leaked clusters.
    public func rewriteSnapshotTable(file: BlockNode) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        guard let refcounter else { return loop.makeFailedFuture(BlockError.eperm) }
        guard !refcounter.needsLargerTable else {
            let promise = loop.makePromise(of: Void.self)
            growRefcountTable { error in
                if let error { return promise.fail(error) }
                promise.completeWith(self.rewriteSnapshotTable(file: file))
            }
            return promise.futureResult
        }
        var rewritten = snapshots
        for index in rewritten.indices {
            rewritten[index].extraDataSize = QCOW2Snapshot.knownExtraData + rewritten[index].unknownExtraData.count
            rewritten[index].diskSize = rewritten[index].diskSize ?? UInt64(length)
        }
        // Only the table is written, as QEMU writes it: at the end of the
        // file, the file ends where the table does.
        let table = QCOW2Snapshot.serializeTable(rewritten, guestSize: UInt64(length))
        // Past QEMU's limit, neither QEMU nor Strata would read it back.
        guard table.count <= QCOW2Snapshot.maxTableBytes else {
            return loop.makeFailedFuture(BlockError(errno: EFBIG, "The snapshot table would be too large"))
        }
        let clusterSize = refcounter.clusterSize
        let clusters = (Int64(table.count) + clusterSize - 1) / clusterSize
        let newOffset: Int64
        do {
            // One cluster (nearly every table) goes where the allocator puts
            // it, lowest free first, as QEMU places it; more at the end. No
            // entries left (a repair dropped them all): no table, at 0.
            if clusters == 0 {
                newOffset = 0
            } else if clusters == 1 {
                newOffset = Int64(try refcounter.allocateCluster())
            } else {
                newOffset = try refcounter.claimAtEnd(clusters * clusterSize)
                for cluster in newOffset / clusterSize..<newOffset / clusterSize + clusters {
                    try refcounter.ensureBlock(for: cluster)
                    try refcounter.adjust(cluster, by: 1)
                }
            }
            for cluster in newOffset / clusterSize..<newOffset / clusterSize + clusters {
                refcounter.metadataClusters.insert(cluster)
            }
        } catch {
            return loop.makeFailedFuture(error)
        }
        let old = (offset: header.snapshotsOffset, length: Int64(snapshotTableLength))
        // The table and the refcounts that own it reach the disk before the
        // header names it.
        let written = table.isEmpty ? loop.makeSucceededVoidFuture() : QCOW2Driver.writeBytes(file, table, at: newOffset)
        return written.flatMap {
            self.flushed(file)
        }.flatMap {
            self.header.snapshotsOffset = UInt64(newOffset)
            self.header.snapshotCount = UInt32(rewritten.count)
            return self.rewriteHeader(file: file)
        }.flatMap {
            self.snapshots = rewritten
            self.snapshotTableLength = table.count
            self.droppedSnapshotExtraData = []
            self.pendingFrees.append((old.offset, old.length))
            return self.flushed(file)
        }.flatMap {
            // QEMU passes the discard of a freed snapshot table down to the
            // file whatever the discard option: the same bytes are left.
            guard old.length > 0 else { return loop.makeSucceededVoidFuture() }
            let freed = self.hostClusters(at: Int64(old.offset), length: old.length)
                .filter { refcounter.refcount($0) == 0 }
            return self.punch(freed, file: file)
        }
    }

    /// `qemu-img check -r all` for entries it dropped from the end of the
    /// table as it read it: the header counts the rest, at once, before
    /// the refcount repair frees what only those held.
    public func writeSnapshotCount(file: BlockNode) -> EventLoopFuture<Void> {
        let count = header.snapshotCount
        let bytes = (0..<4).map { UInt8(truncatingIfNeeded: count >> (24 - 8 * $0)) }
        return QCOW2Driver.writeBytes(file, bytes, at: 60).flatMap { self.flushed(file) }.map {
            self.overhangingSnapshots = 0
        }
    }

    /// Metadata written back and the file synced, as a future.
    private func flushed(_ file: BlockNode) -> EventLoopFuture<Void> {
        let promise = file.eventLoop.makePromise(of: Void.self)
        flush { error in
            if let error { return promise.fail(error) }
            file.flush { error in
                if let error { promise.fail(error) } else { promise.succeed(()) }
            }
        }
        return promise.futureResult
    }
}
