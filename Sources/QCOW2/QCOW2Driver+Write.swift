import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Writing: in place where a cluster is ours (COPIED), otherwise a new
/// cluster at the end of the file filled with the old content around the
/// new bytes (copy-on-write from the backing file, a snapshot, a compressed
/// or zero cluster). Metadata changes stay in memory until
/// `writeBackMetadata`, which writes them in QEMU's order: refcount blocks,
/// refcount table, L2 tables, L1 entries, each step synced before the next,
/// so a crash can leak clusters but never corrupt the image. Freed clusters
/// lose their refcount only after the tables that dropped them are on disk.
extension QCOW2Driver {
    var writable: Bool { refcounter != nil }

    /// Why a write, zero write or discard must fail now: the image is
    /// read-only, its metadata can no longer be written back, or it was
    /// marked corrupt while open. QEMU then fails every
    /// request; Strata still serves reads, so the data can be copied off,
    /// but changes nothing more in metadata it no longer trusts.
    var changeRefusal: BlockError? {
        guard writable else { return .eperm }
        if let metadataFault { return BlockError(errno: EIO, metadataFault) }
        guard let corruptReason else { return nil }
        return BlockError(errno: EIO, "Image is marked corrupt (\(corruptReason)); no more writes until `strata img check -r all`")
    }
    var externalData: Bool { geometry.externalData }

    public func refreshLimits(_ limits: inout BlockLimits) {
        // QEMU zeroes extended-L2 images a subcluster at a time, in the
        // tables only: the file's own zero alignment does not apply.
        limits.zeroAlignment = header.hasExtendedL2 ? header.subclusterSize : header.clusterSize
        limits.discardAlignment = max(limits.discardAlignment, header.clusterSize)
    }

    public var supportedZeroFlags: BlockRequestFlags { [.mayUnmap] }

    // MARK: metadata exclusion

    /// Runs `body` now, or once the metadata writeback in progress ends.
    func whenMetadataIdle(_ body: @escaping () -> Void) {
        if metadataBusy { metadataWaiters.append(body) } else { body() }
    }

    func pin(_ table: QCOW2L2Table) {
        let uses = pinnedL2[table.offset]?.uses ?? 0
        pinnedL2[table.offset] = (table, uses + 1)
    }

    func unpin(_ table: QCOW2L2Table) {
        guard let entry = pinnedL2[table.offset] else { return }
        if entry.uses <= 1 {
            pinnedL2[table.offset] = nil
            // Back in the cache so the next lookup finds this copy.
            l2Cache.insert(table)
        } else {
            pinnedL2[table.offset] = (table, entry.uses - 1)
        }
    }

    /// Runs `body` when no allocation of guest cluster `cluster` is in flight.
    func whenClusterIdle(_ cluster: Int64, _ body: @escaping () -> Void) {
        if allocating[cluster] != nil { allocating[cluster]!.append(body) } else { body() }
    }

    func finishAllocating(_ cluster: Int64) {
        let waiters = allocating.removeValue(forKey: cluster) ?? []
        waiters.forEach { $0() }
    }

    // MARK: L2 tables for writing

    /// Thrown when a request must look its table up again.
    static let retry = BlockError(errno: -1, "retry")

    /// The L2 table for `index`, made private to the active L1 (allocated,
    /// or copied from a table a snapshot shares). Synchronous: the caller
    /// holds the table it looked up, or nil for an empty L1 entry.
    func writableL2(_ index: Int, current looked: QCOW2L2Table?) throws -> QCOW2L2Table {
        let entry = l1[index]
        let named = entry & QCOW2Entry.offsetMask
        // The caller's lookup may be stale (another request replaced the
        // table meanwhile): use what the L1 entry names now.
        var current = looked
        if current?.offset != named {
            if named == 0 {
                current = nil
            } else if let loaded = cachedL2Table(at: named) {
                current = loaded
            } else {
                throw Self.retry
            }
        }
        if let current, entry & QCOW2Entry.copied != 0 {
            if let other = metadataOverlappingL2Table(at: current.offset) {
                throw corruption("Preventing invalid write on metadata (overlaps with \(other))")
            }
            return current
        }
        guard let refcounter else { throw BlockError.eperm }
        guard let buffer = AlignedBuffer.zeroed(count: header.clusterSize, alignment: 4096) else { throw BlockError.enomem }
        let offset = try refcounter.allocateCluster()
        let table = QCOW2L2Table(offset: offset, buffer: buffer, entrySize: header.l2EntrySize)
        if let current {
            // A shared table: copy it; its clusters stay shared (no COPIED).
            buffer.pointer.copyMemory(from: current.buffer.pointer, byteCount: header.clusterSize)
            for slot in 0..<table.count {
                let value = table.entry(slot)
                if value & QCOW2Entry.copied != 0 { table.setEntry(slot, value & ~QCOW2Entry.copied) }
            }
            pendingFrees.append((current.offset, Int64(header.clusterSize)))
        }
        refcounter.metadataClusters.insert(Int64(offset) / Int64(header.clusterSize))
        dirtyL2[offset] = table
        l2Cache.insert(table)
        l1[index] = offset | QCOW2Entry.copied
        dirtyL1.insert(index)
        return table
    }

    /// Host ranges an entry references, to release when it is replaced;
    /// nil for none, and for an entry of a corrupt image that names
    /// metadata or an unaligned cluster (freeing those would corrupt more).
    func references(of entry: UInt64) -> (UInt64, Int64)? {
        if entry & QCOW2Entry.compressed != 0 {
            guard case .compressed(let host, let size)? = QCOW2Entry.mapping(entry: entry, bitmap: nil, subcluster: 0,
                                                                           clusterBits: header.clusterBits) else { return nil }
            let start = host & ~511
            let length = Int64(size) + Int64(host & 511)
            let clusterSize = Int64(header.clusterSize)
            // A hostile entry naming metadata must not free it: it would be
            // handed out as data next.
            let clusters = Int64(start) / clusterSize...(Int64(start) + length - 1) / clusterSize
            guard !clusters.contains(where: refcounter!.holdsMetadata) else { return nil }
            return (start, length)
        }
        let host = entry & QCOW2Entry.offsetMask
        guard host != 0, !externalData, host % UInt64(header.clusterSize) == 0,
              !refcounter!.holdsMetadata(Int64(host) / Int64(header.clusterSize)) else { return nil }
        return (host, Int64(header.clusterSize))
    }

    // MARK: write

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags,
                      completion: @escaping BlockCompletion) {
        if let refusal = changeRefusal { return completion(refusal) }
        let clusterSize = geometry.clusterSize
        if buffer.count > 0, let host = contiguousInPlaceHost(at: offset, count: buffer.count) {
            return writeInPlace(at: host, from: buffer, completion: completion)
        }
        let group = PendingGroup(completion: completion)
        var position = offset
        let end = offset + Int64(buffer.count)
        while position < end {
            let clusterEnd = min(end, (position / clusterSize + 1) * clusterSize)
            let start = Int(position - offset)
            let piece = UnsafeRawBufferPointer(rebasing: buffer[start..<start + Int(clusterEnd - position)])
            group.begin()
            writeCluster(at: position, piece: piece) { group.end($0) }
            position = clusterEnd
        }
        group.finishIssuing()
    }

    /// Where a write can go as one host write: every cluster it touches is
    /// owned outright and holds data (the checks of the per-cluster path),
    /// lies right after the previous one in the file, has its L2 table
    /// cached and no allocation in progress. Nil sends the write cluster by
    /// cluster, which also reports whatever is wrong. A 1 MiB write over
    /// allocated 64 KiB clusters is then one file write, not sixteen, as in
    /// QEMU; and a write within one cluster skips the per-cluster path's
    /// group and closures (callgrind: 4,300 instructions per 4 KiB write).
    private func contiguousInPlaceHost(at offset: Int64, count: Int) -> Int64? {
        let clusterSize = geometry.clusterSize
        let end = offset + Int64(count)
        var position = offset
        var start: Int64 = -1
        var next: Int64 = -1
        while position < end {
            let cluster = geometry.cluster(of: position)
            let index = geometry.l1Index(of: position)
            guard allocating.isEmpty || allocating[cluster] == nil, index < l1.count else { return nil }
            let l1Entry = l1[index]
            let tableOffset = l1Entry & QCOW2Entry.offsetMask
            guard l1Entry & QCOW2Entry.copied != 0, l1Entry & QCOW2Entry.l1ReservedMask == 0, tableOffset != 0,
                  let table = cachedL2Table(at: tableOffset) else { return nil }
            let clusterEnd = min(end, (cluster + 1) * clusterSize)
            let slot = geometry.l2Slot(of: cluster)
            guard let host = inPlaceHost(table, slot: slot, offset: position, count: Int(clusterEnd - position)),
                  inPlaceWriteRefusal(host: host) == nil else { return nil }
            let hostPosition = Int64(host) + geometry.offsetInCluster(position)
            if start < 0 {
                start = hostPosition
            } else if hostPosition != next {
                return nil
            }
            next = hostPosition + (clusterEnd - position)
            position = clusterEnd
        }
        return start >= 0 ? start : nil
    }

    /// Why an in-place write to the cluster at `host` would corrupt the
    /// image, or nil. Metadata lives in the image file; data in an external
    /// file cannot overlap it.
    private func inPlaceWriteRefusal(host: UInt64) -> String? {
        if geometry.offsetInCluster(Int64(host)) != 0 {
            return "Cluster allocation offset 0x\(String(host, radix: 16)) unaligned"
        }
        guard !externalData else { return nil }
        let cluster = geometry.cluster(of: Int64(host))
        if refcounter!.holdsMetadata(cluster) {
            return "Preventing invalid write on metadata at 0x\(String(host, radix: 16))"
        }
        if Int64(host) >= refcounter!.allocationEnd {
            // No refcount covers it: a later allocation could hand the same
            // cluster out again.
            return "Data cluster at 0x\(String(host, radix: 16)) lies past the allocated end of the image"
        }
        if refcounter!.refcount(cluster) == 0 {
            // Free by its refcount, so the allocator could hand it to
            // another guest cluster while this one still writes to it.
            return "Data cluster at 0x\(String(host, radix: 16)) has a reference count of 0"
        }
        return nil
    }

    /// One write to owned clusters, contiguous in the file: those written
    /// are not handed out again before it lands, should a discard free them.
    private func writeInPlace(at host: Int64, from buffer: UnsafeRawBufferPointer,
                              completion: @escaping BlockCompletion) {
        dataFile.write(at: host, from: buffer, flags: [], completion: countingUse(completion))
    }

    /// Writes within one cluster.
    private func writeCluster(at offset: Int64, piece: UnsafeRawBufferPointer, completion: @escaping BlockCompletion) {
        let clusterSize = Int64(header.clusterSize)
        let cluster = offset / clusterSize
        let index = Int(offset / header.bytesPerL2)
        let slot = Int(cluster % Int64(header.l2Entries))
        func attempt() {
            whenClusterIdle(cluster) {
                self.l2Table(for: index) { loaded in
                    guard case .success(let table) = loaded else {
                        if case .failure(let error) = loaded { completion(error) }
                        return
                    }
                    // The lookup may have waited: check again.
                    guard self.allocating[cluster] == nil else { return attempt() }
                    if let table, table.offset != self.l1[index] & QCOW2Entry.offsetMask {
                        return attempt()  // replaced meanwhile: look again
                    }
                    if let table, let refusal = self.misalignedClusterRefusal(table.entry(slot), guestOffset: offset) {
                        return self.markCorrupt(refusal, completion: completion)
                    }
                    if let table, self.geometry.extendedL2,
                       QCOW2Entry.hasInvalidBitmap(entry: table.entry(slot), bitmap: table.bitmap(slot),
                                                   externalData: self.externalData) {
                        // One space, unlike the read path's line: QEMU's words.
                        let place = QCOW2Driver.entryPlace(table, slot)
                        return self.markCorrupt("Invalid cluster entry found (\(place))", completion: completion)
                    }
                    if let table, self.l1[index] & QCOW2Entry.copied != 0,
                       let host = self.inPlaceHost(table, slot: slot, offset: offset, count: piece.count) {
                        if let refusal = self.inPlaceWriteRefusal(host: host) {
                            return self.markCorrupt(refusal, completion: completion)
                        }
                        return self.writeInPlace(at: Int64(host) + offset % clusterSize, from: piece, completion: completion)
                    }
                    self.whenMetadataIdle {
                        guard self.allocating[cluster] == nil else { return attempt() }
                        self.allocating[cluster] = []
                        self.allocateAndWrite(cluster: cluster, index: index, slot: slot, table: table,
                                              offset: offset, piece: piece) { error in
                            self.finishAllocating(cluster)
                            if error == Self.retry { return attempt() }
                            completion(error)
                        }
                    }
                }
            }
        }
        attempt()
    }

    /// Why a write may not touch the cluster of `entry`: one the image
    /// owns (COPIED) at a host offset off the cluster grid. QEMU checks
    /// this first, in these words, whatever the write would do next.
    private func misalignedClusterRefusal(_ entry: UInt64, guestOffset: Int64) -> String? {
        let host = entry & QCOW2Entry.offsetMask
        guard entry & QCOW2Entry.copied != 0, entry & QCOW2Entry.compressed == 0,
              geometry.offsetInCluster(Int64(host)) != 0 else { return nil }
        // QEMU names the kind by bit 0, with extended L2 too (where it
        // means nothing else).
        let kind = entry & QCOW2Entry.zeroFlag != 0 ? "Preallocated zero" : "Data"
        return "\(kind) cluster offset 0x\(String(host, radix: 16)) unaligned (guest offset: \(guestOffset.alternateHex))"
    }

    /// The host offset of a cluster the active image owns outright, whose
    /// touched subclusters all hold data: such writes go straight to it.
    private func inPlaceHost(_ table: QCOW2L2Table, slot: Int, offset: Int64, count: Int) -> UInt64? {
        let entry = table.entry(slot)
        guard entry & QCOW2Entry.copied != 0, entry & QCOW2Entry.compressed == 0 else { return nil }
        let host = entry & QCOW2Entry.offsetMask
        if geometry.extendedL2 {
            let bitmap = table.bitmap(slot)
            guard !QCOW2Entry.hasInvalidBitmap(entry: entry, bitmap: bitmap, externalData: externalData) else { return nil }
            let sub = geometry.subclusterSize
            let inCluster = geometry.offsetInCluster(offset)
            let first = Int(inCluster / sub)
            let last = Int((inCluster + Int64(count) - 1) / sub)
            let wanted = UInt64((1 << (last - first + 1)) - 1) << UInt64(first)
            guard bitmap & wanted == wanted, bitmap >> 32 & wanted == 0 else { return nil }
            return host
        }
        guard entry & QCOW2Entry.zeroFlag == 0 else { return nil }
        return host != 0 || externalData ? host : nil
    }

    /// A new cluster (or, for an owned cluster with unallocated subclusters,
    /// the same one) filled with the old content and the new bytes.
    private func allocateAndWrite(cluster: Int64, index: Int, slot: Int, table current: QCOW2L2Table?,
                                  offset: Int64, piece: UnsafeRawBufferPointer, completion: @escaping BlockCompletion) {
        let clusterSize = Int64(header.clusterSize)
        let clusterStart = cluster * clusterSize
        let table: QCOW2L2Table
        let oldEntry: UInt64
        let host: UInt64
        var reusing = false
        if refcounter!.needsLargerTable {
            growRefcountTable { error in completion(error ?? Self.retry) }
            return
        }
        do {
            table = try writableL2(index, current: current)
            oldEntry = table.entry(slot)
            if header.hasExtendedL2, !externalData, oldEntry & QCOW2Entry.copied != 0 {
                let reused = oldEntry & QCOW2Entry.offsetMask
                if reused != 0, let refusal = inPlaceWriteRefusal(host: reused) {
                    return markCorrupt(refusal, completion: completion)
                }
            }
            if externalData {
                host = UInt64(clusterStart)
            } else if header.hasExtendedL2, oldEntry & QCOW2Entry.copied != 0, oldEntry & QCOW2Entry.offsetMask != 0,
                      oldEntry & QCOW2Entry.compressed == 0 {
                host = oldEntry & QCOW2Entry.offsetMask
                reusing = true
            } else {
                host = try refcounter!.allocateCluster()
            }
        } catch {
            return completion(error as? BlockError ?? .eio)
        }
        let inCluster = Int(offset - clusterStart)
        // With extended L2, a cluster without data elsewhere (fresh, or our
        // own, which includes every cluster of an external data file) gets
        // only the touched subclusters written: the others keep their
        // state (unallocated ones still read from the backing file).
        let oldHost = oldEntry & QCOW2Entry.offsetMask
        let ownCluster = reusing || externalData
        let perSubcluster = header.hasExtendedL2 && oldEntry & QCOW2Entry.compressed == 0
            && (ownCluster || oldHost == 0)
        let regionStart: Int
        let regionEnd: Int
        if perSubcluster {
            let sub = header.subclusterSize
            regionStart = inCluster / sub * sub
            regionEnd = (inCluster + piece.count - 1) / sub * sub + sub
        } else {
            regionStart = 0
            regionEnd = Int(clusterSize)
        }
        let regionLength = regionEnd - regionStart
        guard let bounce = node?.graph.bufferPool.take(count: regionLength, alignment: 4096) else {
            return abandon(ownCluster ? nil : host, error: .enomem, completion: completion)
        }
        // Keep this table object the one every lookup finds until the new
        // entry is in it.
        pin(table)
        let completion: BlockCompletion = { error in
            self.unpin(table)
            completion(error)
        }
        let finishWrite = {
            (bounce.pointer + (inCluster - regionStart)).copyMemory(from: piece.baseAddress!, byteCount: piece.count)
            let data = UnsafeRawBufferPointer(start: bounce.pointer, count: regionLength)
            self.dataFile.write(at: Int64(host) + Int64(regionStart), from: data, flags: []) { error in
                self.node?.graph.bufferPool.give(bounce)
                if let error {
                    return self.abandon(ownCluster ? nil : host, error: error, completion: completion)
                }
                self.whenMetadataIdle {
                    table.setEntry(slot, host | QCOW2Entry.copied)
                    if self.header.hasExtendedL2 {
                        if perSubcluster {
                            let sub = self.header.subclusterSize
                            let first = regionStart / sub
                            let count = regionLength / sub
                            let mask = UInt64((1 << count) - 1) << UInt64(first)
                            let old = table.bitmap(slot)
                            let allocated = (ownCluster ? old & 0xffff_ffff : 0) | mask
                            let zero = (old >> 32) & ~mask
                            table.setBitmap(slot, zero << 32 | allocated)
                        } else {
                            table.setBitmap(slot, 0xffff_ffff)
                        }
                    }
                    self.dirtyL2[table.offset] = table
                    if !reusing, let released = self.references(of: oldEntry) {
                        self.pendingFrees.append(released)
                    }
                    completion(nil)
                }
            }
        }
        if piece.count == regionLength {
            return finishWrite()
        }
        // The old content of the region, as a reader sees it now (past the
        // end of the image it reads as zeroes).
        let fill = UnsafeMutableRawBufferPointer(start: bounce.pointer, count: regionLength)
        read(at: clusterStart + Int64(regionStart), into: fill, flags: []) { error in
            if let error {
                self.node?.graph.bufferPool.give(bounce)
                return self.abandon(ownCluster ? nil : host, error: error, completion: completion)
            }
            finishWrite()
        }
    }

    /// An allocating write failed (a full disk): a cluster it took new
    /// goes back to the allocator, as in QEMU, instead of staying counted
    /// as a leak.
    private func abandon(_ newCluster: UInt64?, error: BlockError, completion: @escaping BlockCompletion) {
        guard let newCluster else { return completion(error) }
        whenMetadataIdle {
            self.free([(newCluster, Int64(self.header.clusterSize))])
            completion(error)
        }
    }
}
