import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Metadata on its way to disk: growing the refcount table, writing back
/// changed refcount blocks, L2 tables and L1 entries in crash-safe order on
/// flush, and marking the image corrupt when an overlap check fails.
extension QCOW2Driver {
    // MARK: growing the refcount table

    /// Replaces the refcount table with one twice as large (or more) at the
    /// end of the file, with refcount blocks covering itself: blocks and
    /// table are written and synced before the header points to the new
    /// table, and the old table's clusters are released after that.
    func growRefcountTable(completion: @escaping BlockCompletion) {
        writeBackMetadata { error in
            if let error { return completion(error) }
            guard !self.metadataBusy else {
                self.metadataWaiters.append { self.growRefcountTable(completion: completion) }
                return
            }
            let refcounter = self.refcounter!
            guard refcounter.needsLargerTable else { return completion(nil) }
            let clusterSize = refcounter.clusterSize
            let oldClusters = (Int64(refcounter.table.count) * 8 + clusterSize - 1) / clusterSize
            // (An empty table, which no open lets through, still grows.)
            var count = max(Int64(refcounter.table.count), 1) * 2
            while (refcounter.allocationEnd / clusterSize + 64 + count * 8 / clusterSize) / refcounter.perBlock >= count {
                count *= 2
            }
            let newClusters = (count * 8 + clusterSize - 1) / clusterSize
            // The table and at most a block per table cluster, plus one
            // counting those: checked now, so that the claims below cannot
            // run out of offsets once memory has started to change.
            guard UInt64(newClusters) * UInt64(clusterSize) <= QCOW2Header.maxRefcountTableBytes,
                  (2 * newClusters + 2) * clusterSize <= QCOW2Refcounter.hostOffsetLimit - refcounter.allocationEnd else {
                return completion(BlockError(errno: ENOSPC, "The refcount table cannot grow further"))
            }
            do {
                let start = try refcounter.claimAtEnd(newClusters * clusterSize)
                self.tableMove = QCOW2RefcountTableMove(oldOffset: refcounter.tableOffset, oldClusters: oldClusters,
                                                        newOffset: start, newClusters: newClusters)
                refcounter.tableOffset = UInt64(start)
                refcounter.table += [UInt64](repeating: 0, count: Int(count) - refcounter.table.count)
                for index in 0..<newClusters {
                    let cluster = start / clusterSize + index
                    try refcounter.ensureBlock(for: cluster)
                    try refcounter.adjust(cluster, by: 1)
                    refcounter.metadataClusters.insert(cluster)
                }
            } catch {
                // Memory ran out (the offsets were checked): the new table
                // is half counted, and no writeback may trust it.
                let reason = "The refcount table could not grow in memory (\(error)); the image takes no more changes"
                self.metadataFault = reason
                return completion(BlockError(errno: (error as? BlockError)?.errno ?? ENOMEM, reason))
            }
            self.metadataBusy = true
            self.finishTableMove { self.endMetadataWork($0, completion: completion) }
        }
    }

    /// Writes the moved table and every changed refcount block, syncs, then
    /// points the header at the table and releases the old one. On failure
    /// what was dirty stays dirty and the move stays pending: the next
    /// writeback tries again, so a disk that was full and has room again
    /// ends with a consistent image. Call with `metadataBusy` set.
    private func finishTableMove(completion: @escaping BlockCompletion) {
        guard let move = tableMove else { return completion(nil) }
        let refcounter = self.refcounter!
        let clusterSize = refcounter.clusterSize
        let blockOffsets = refcounter.dirtyBlocks
        refcounter.dirtyBlocks = []
        // Written whole below, and again by the next attempt.
        refcounter.dirtyTableClusters = []
        let blocks = blockOffsets.compactMap { offset in refcounter.blocks[offset].map { (Int64(offset), $0.bytes) } }
        let table = (0..<Int(move.newClusters)).map { cluster in
            (move.newOffset + Int64(cluster) * clusterSize, tableClusterBytes(cluster))
        }
        func failed(_ error: BlockError) {
            refcounter.dirtyBlocks.formUnion(blockOffsets)
            completion(error)
        }
        writeAll(blocks) { error in
            if let error { return failed(error) }
            self.writeAll(table) { error in
                if let error { return failed(error) }
                self.file.flush { error in
                    if let error { return failed(error) }
                    let named = (self.header.refcountTableOffset, self.header.refcountTableClusters)
                    self.header.refcountTableOffset = UInt64(move.newOffset)
                    self.header.refcountTableClusters = UInt32(move.newClusters)
                    self.rewriteHeader(file: self.file).whenComplete { result in
                        if case .failure(let error) = result {
                            // Header rewrites asked for from now on (marking
                            // the image corrupt) must not name a table that
                            // may not be on disk. (One already queued names
                            // it, but the table and its blocks were flushed
                            // before this write, so it is complete.)
                            (self.header.refcountTableOffset, self.header.refcountTableClusters) = named
                            return failed(error as? BlockError ?? .eio)
                        }
                        for index in 0..<move.oldClusters {
                            refcounter.metadataClusters.remove(Int64(move.oldOffset) / clusterSize + index)
                        }
                        self.pendingFrees.append((move.oldOffset, move.oldClusters * clusterSize))
                        self.tableMove = nil
                        completion(nil)
                    }
                }
            }
        }
    }

    /// Ends a writeback or a table move: tells `completion`, then lets the
    /// work that waited run, each piece only while no writeback is running.
    /// `completion` may start the next writeback at once (a flush that
    /// repeats does), and the waiting work changes tables and blocks that a
    /// writeback writes from memory as they are.
    func endMetadataWork(_ error: BlockError?, completion: BlockCompletion) {
        metadataBusy = false
        let waiters = metadataWaiters
        metadataWaiters = []
        completion(error)
        waiters.forEach(whenMetadataIdle)
    }

    // MARK: metadata writeback

    public func flush(completion: @escaping BlockCompletion) {
        guard writable else { return file.flush(completion: completion) }
        // A header write in flight (the corrupt bit a failed read set, say)
        // is on disk once a flush after it ends, as in QEMU, where the
        // request that set it waited for it.
        if headerWritesInFlight > 0, let pending = lastHeaderWrite {
            pending.whenComplete { _ in self.flush(completion: completion) }
            return
        }
        writeBackMetadata { error in
            if let error { return completion(error) }
            // Releasing clusters dirtied refcount blocks: write those too, so
            // a clean flush leaves no leaks behind.
            guard self.refcounter!.dirtyBlocks.isEmpty else { return self.flush(completion: completion) }
            // The clusters the writeback freed are being punched: a flush
            // ends once they are the allocator's again, so writes after it
            // reuse them (as they would in QEMU, which frees at once)
            // instead of growing the file.
            // (An external data file was synced by the writeback's first step.)
            self.afterPunches { completion(nil) }
        }
    }

    /// Syncs an external data file, then the image file.
    private func syncDataAndImage(completion: @escaping BlockCompletion) {
        guard dataFile !== file else { return file.flush(completion: completion) }
        dataFile.flush { error in
            if let error { return completion(error) }
            self.file.flush(completion: completion)
        }
    }

    private func afterPunches(_ body: @escaping () -> Void) {
        if punchesInFlight == 0 { body() } else { punchWaiters.append(body) }
    }

    /// Writes back everything changed, in crash-safe order; then releases
    /// clusters whose last reference is gone from disk.
    func writeBackMetadata(completion: @escaping BlockCompletion) {
        guard !metadataBusy else {
            metadataWaiters.append { self.writeBackMetadata(completion: completion) }
            return
        }
        if let metadataFault { return completion(BlockError(errno: EIO, metadataFault)) }
        metadataBusy = true
        // The previous writeback's serialised tables are no longer in use.
        scratchBuffers.forEach { $0.deallocate() }
        scratchBuffers = []
        if tableMove != nil {
            // Nothing below may reach the disk before the header names the
            // table that counts it.
            return finishTableMove { error in
                if let error { return self.endMetadataWork(error, completion: completion) }
                self.metadataBusy = false
                self.writeBackMetadata(completion: completion)
            }
        }
        let refcounter = self.refcounter!
        let clusterSize = header.clusterSize
        let frees = pendingFrees
        pendingFrees = []
        let blocks = refcounter.dirtyBlocks.compactMap { offset in refcounter.blocks[offset].map { (offset, $0) } }
        refcounter.dirtyBlocks = []
        let tableClusters = refcounter.dirtyTableClusters.sorted()
        refcounter.dirtyTableClusters = []
        let tables = Array(dirtyL2.values)
        dirtyL2 = [:]
        tables.forEach(pin)
        let l1Entries = dirtyL1.sorted()
        dirtyL1 = []

        func finish(_ error: BlockError?) {
            metadataBusy = false
            tables.forEach(unpin)
            if error == nil {
                // The tables no longer reference these: now drop the counts.
                self.free(frees)
            } else {
                // Nothing was lost: what failed to reach the disk stays dirty.
                pendingFrees += frees
                for table in tables where dirtyL2[table.offset] == nil { dirtyL2[table.offset] = table }
                for (offset, _) in blocks { refcounter.dirtyBlocks.insert(offset) }
                refcounter.dirtyTableClusters.formUnion(tableClusters)
                dirtyL1.formUnion(l1Entries)
            }
            endMetadataWork(error, completion: completion)
        }
        // 1. refcount blocks, and all data written so far, synced: in an
        // external data file too, so that no L2 entry reaches the disk
        // before the data (copied from a backing file, say) it maps.
        writeAll(blocks.map { (Int64($0.0), $0.1.bytes) }) { error in
            if let error { return finish(error) }
            self.syncDataAndImage { error in
                if let error { return finish(error) }
                // 2. refcount table clusters that name new blocks.
                let table = tableClusters.map { cluster -> (Int64, UnsafeRawBufferPointer) in
                    let bytes = self.tableClusterBytes(cluster)
                    return (Int64(refcounter.tableOffset) + Int64(cluster * clusterSize), bytes)
                }
                self.writeAll(table) { error in
                    if let error { return finish(error) }
                    self.syncIf(!table.isEmpty) { error in
                        if let error { return finish(error) }
                        // 3. L2 tables.
                        self.writeAll(tables.map { (Int64($0.offset), $0.buffer.bytes) }) { error in
                            if let error { return finish(error) }
                            self.syncIf(!tables.isEmpty) { error in
                                if let error { return finish(error) }
                                // 4. L1 entries.
                                let entries = l1Entries.map { index -> (Int64, UnsafeRawBufferPointer) in
                                    (Int64(self.header.l1TableOffset) + Int64(index * 8), self.l1EntryBytes(index))
                                }
                                self.writeAll(entries) { error in
                                    if let error { return finish(error) }
                                    self.syncIf(!entries.isEmpty) { finish($0) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    private func syncIf(_ needed: Bool, completion: @escaping BlockCompletion) {
        needed ? file.flush(completion: completion) : completion(nil)
    }

    /// Issues every write at once; completes with the first error.
    func writeAll(_ writes: [(Int64, UnsafeRawBufferPointer)], completion: @escaping BlockCompletion) {
        let group = PendingGroup(completion: completion)
        for (offset, bytes) in writes {
            group.begin()
            file.write(at: offset, from: bytes, flags: []) { group.end($0) }
        }
        group.finishIssuing()
    }

    /// One cluster of the refcount table, big-endian (kept alive by the pool).
    func tableClusterBytes(_ cluster: Int) -> UnsafeRawBufferPointer {
        let refcounter = self.refcounter!
        let perCluster = header.clusterSize / 8
        let buffer = scratch(header.clusterSize)
        for index in 0..<perCluster {
            let entry = cluster * perCluster + index
            let value = entry < refcounter.table.count ? refcounter.table[entry] : 0
            buffer.storeBytes(of: value.bigEndian, toByteOffset: index * 8, as: UInt64.self)
        }
        return UnsafeRawBufferPointer(start: buffer, count: header.clusterSize)
    }

    private func l1EntryBytes(_ index: Int) -> UnsafeRawBufferPointer {
        let buffer = scratch(8)
        buffer.storeBytes(of: l1[index].bigEndian, as: UInt64.self)
        return UnsafeRawBufferPointer(start: buffer, count: 8)
    }

    /// Memory for one writeback's serialised metadata, freed when the
    /// next writeback starts (the writes using it are finished by then).
    private func scratch(_ count: Int) -> UnsafeMutableRawPointer {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 4096)
        scratchBuffers.append(buffer)
        return buffer
    }

    // MARK: corruption

    /// Sets the corrupt bit on disk, where the caller has said why.
    public func setCorruptBit(file: BlockNode) -> EventLoopFuture<Void> {
        header.incompatibleFeatures.insert(.corrupt)
        return rewriteHeader(file: file)
    }

    /// Marks the image corrupt on disk, as QEMU does, and fails the request
    /// once the header says so.
    func markCorrupt(_ reason: String, completion: @escaping BlockCompletion) {
        markCorrupt(reason).whenComplete { _ in completion(BlockError(errno: EIO, reason)) }
    }

    /// Marks the image corrupt on disk: told once, in QEMU's words, on the
    /// server's stderr; later corruptions keep the first reason and wait
    /// for the same header write, or try again if it failed.
    /// `prepareToClose` waits for it too.
    @discardableResult
    func markCorrupt(_ reason: String) -> EventLoopFuture<Void> {
        if corruptReason == nil {
            fputs("qcow2: Marking image as corrupt: \(reason); further corruption events will be suppressed\n", stderr)
            corruptReason = reason
        }
        if let corruptMarking { return corruptMarking }
        header.incompatibleFeatures.insert(.corrupt)
        let write = rewriteHeader(file: file)
        corruptMarking = write
        write.whenFailure { _ in self.corruptMarking = nil }
        return write
    }
}
