import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Zero writes and discards, whole clusters at a time (zero writes by
/// subcluster with extended L2, as in QEMU): the zero flag or bits (with or
/// without keeping the allocation) or an unallocated entry, and the
/// references freed once the changed tables are on disk.
extension QCOW2Driver {
    public var zeroesPartialUnits: Bool { true }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                            completion: @escaping BlockCompletion) {
        if let refusal = changeRefusal { return completion(refusal) }
        // Version 2 has no zero flag; without a backing file, an unallocated
        // cluster reads as zeroes, so QEMU frees clusters instead (but, as
        // QEMU, never for a request that must not fall back).
        guard header.version >= 3 || (backingNode == nil && !flags.contains(.noFallback)) else {
            return completion(.enotsup)
        }
        let granule = Int64(header.hasExtendedL2 ? header.subclusterSize : header.clusterSize)
        guard offset % granule == 0, length % granule == 0 || offset + length == self.length else {
            return zeroOffTheGrid(at: offset, length: length, granule: granule, flags: flags, completion: completion)
        }
        if header.autoclearFeatures.contains(.rawExternalData) {
            // A raw data file must always hold the guest's bytes: zero them
            // there first, then mark the clusters zero, as QEMU does.
            return dataFile.writeZeroes(at: offset, length: length, flags: flags) { error in
                if let error { return completion(error) }
                self.markZero(at: offset, length: length, flags: flags, completion: completion)
            }
        }
        markZero(at: offset, length: length, flags: flags, completion: completion)
    }

    /// Whole clusters become zero in the tables, keeping their allocation
    /// unless the request may unmap it. Part of a cluster (extended L2)
    /// gets its subclusters' zero bits set and allocation bits cleared,
    /// the host cluster kept; compressed data cannot be zeroed in part.
    /// With `onlyOverNoData`, a cluster whose covered part holds data
    /// (or compressed data) is left alone and the request fails ENOTSUP.
    private func markZero(at offset: Int64, length: Int64, flags: BlockRequestFlags, onlyOverNoData: Bool = false,
                          completion: @escaping BlockCompletion) {
        changeClusters(from: offset, length: length, completion: completion) { entry, bitmap, covered in
            if onlyOverNoData, self.holdsData(entry: entry, bitmap: bitmap, covered: covered) {
                throw BlockError.enotsup
            }
            if let bitmap, covered != 0xffff_ffff {
                guard entry & QCOW2Entry.compressed == 0 else { throw BlockError.enotsup }
                return (entry, (bitmap | covered << 32) & ~covered, false)
            }
            if self.header.version < 3 { return (0, nil, true) }
            let owned = entry & QCOW2Entry.copied != 0 && entry & QCOW2Entry.compressed == 0
                && (entry & QCOW2Entry.offsetMask != 0 || self.externalData)
            let keep = owned && !flags.contains(.mayUnmap)
            if self.header.hasExtendedL2 {
                return (keep ? entry & (QCOW2Entry.offsetMask | QCOW2Entry.copied) : 0, 0xffff_ffff_0000_0000, !keep)
            }
            return (keep ? (entry & (QCOW2Entry.offsetMask | QCOW2Entry.copied)) | QCOW2Entry.zeroFlag : QCOW2Entry.zeroFlag,
                    nil, !keep)
        }
    }

    /// A zero write off the (sub)cluster grid, QEMU's way: when the rest of
    /// the (sub)clusters it touches reads as zeroes already (through the
    /// backing chain) and they hold no data of their own, all of them
    /// become zero in the table; otherwise ENOTSUP, and the node writes
    /// zeroes as data. (The node hands over one piece of its zero
    /// alignment at most: one (sub)cluster, or a few where the file's
    /// request alignment is larger, as 4 KiB sectors under O_DIRECT with
    /// 2 KiB subclusters.) The no-data test is made again as the table
    /// changes, so a write landing meanwhile is never zeroed over. A raw
    /// data file would need its bytes zeroed first, outside that test:
    /// such images write zeroes.
    private func zeroOffTheGrid(at offset: Int64, length: Int64, granule: Int64, flags: BlockRequestFlags,
                                completion: @escaping BlockCompletion) {
        let start = offset / granule * granule
        let end = min((offset + length + granule - 1) / granule * granule, self.length)
        guard !header.autoclearFeatures.contains(.rawExternalData) else { return completion(.enotsup) }
        readsAsZero(from: start, to: offset) { before in
            guard before else { return completion(.enotsup) }
            self.readsAsZero(from: offset + length, to: end) { after in
                guard after else { return completion(.enotsup) }
                self.markZero(at: start, length: end - start, flags: flags, onlyOverNoData: true, completion: completion)
            }
        }
    }

    /// Whether all of `[start, end)` reads as zeroes, as block status
    /// through the backing chain tells without reading data. Each further
    /// answer is asked for a loop tick later: a backing chain whose
    /// answers are a few bytes long each (a hostile image) must not
    /// deepen the stack.
    private func readsAsZero(from start: Int64, to end: Int64, completion: @escaping (Bool) -> Void) {
        guard start < end else { return completion(true) }
        guard let node else { return completion(false) }
        node.blockStatusAbove(at: start, length: end - start) { result in
            guard case .success(let status) = result, status.flags.contains(.zero) else { return completion(false) }
            let next = start + status.length
            guard next < end else { return completion(true) }
            node.eventLoop.execute { self.readsAsZero(from: next, to: end, completion: completion) }
        }
    }

    /// Whether the `covered` part of an entry's cluster holds data of its
    /// own (compressed, a plain cluster, or allocated subclusters).
    private func holdsData(entry: UInt64, bitmap: UInt64?, covered: UInt64) -> Bool {
        guard entry & QCOW2Entry.compressed == 0 else { return true }
        if let bitmap {
            return bitmap & covered != 0
                || QCOW2Entry.hasInvalidBitmap(entry: entry, bitmap: bitmap, externalData: externalData)
        }
        guard entry & QCOW2Entry.zeroFlag == 0 else { return false }
        return entry & QCOW2Entry.offsetMask != 0 || (externalData && entry & QCOW2Entry.copied != 0)
    }

    public func discard(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        if let refusal = changeRefusal { return completion(refusal) }
        // Discarding from a raw data file's tables would unhook its bytes.
        guard !header.autoclearFeatures.contains(.rawExternalData) else { return completion(nil) }
        let clusterSize = Int64(header.clusterSize)
        guard offset % clusterSize == 0, length % clusterSize == 0 || offset + length == self.length else {
            return completion(nil)
        }
        // Over a backing file a discarded cluster must read as zero, not as
        // the backing file's old data.
        let zero = backingNode != nil
        if zero, header.version < 3 { return completion(nil) }
        changeClusters(from: offset, length: length, completion: completion) { _, _, _ in
            if self.header.hasExtendedL2 { return (0, zero ? 0xffff_ffff_0000_0000 : 0, true) }
            return (zero ? QCOW2Entry.zeroFlag : 0, nil, true)
        }
    }

    /// Rewrites the entries of the clusters `[offset, offset + length)`
    /// touches; `change` gets the entry, its bitmap (extended L2) and the
    /// subclusters the range covers (all 32 bits for a whole cluster), and
    /// returns the new entry, the new bitmap and whether the old host
    /// cluster is released.
    private func changeClusters(from offset: Int64, length: Int64, completion: @escaping BlockCompletion,
                                change: @escaping (UInt64, UInt64?, UInt64) throws -> (UInt64, UInt64?, Bool)) {
        let clusterSize = Int64(header.clusterSize)
        let end = offset + length
        let group = PendingGroup(completion: completion)
        var cluster = offset / clusterSize
        let last = (offset + length - 1) / clusterSize
        while cluster <= last {
            let current = cluster
            let index = Int(current * clusterSize / header.bytesPerL2)
            let slot = Int(current % Int64(header.l2Entries))
            let covered = coveredSubclusters(of: current, from: offset, to: end)
            group.begin()
            func attempt() {
                whenClusterIdle(current) {
                    self.l2Table(for: index) { loaded in
                        guard case .success(let existing) = loaded else {
                            if case .failure(let error) = loaded { group.end(error) }
                            return
                        }
                        self.whenMetadataIdle {
                            guard self.allocating[current] == nil else { return attempt() }
                            if self.refcounter!.needsLargerTable {
                                return self.growRefcountTable { error in
                                    if let error { return group.end(error) }
                                    attempt()
                                }
                            }
                            do {
                                if existing == nil, self.l1[index] & QCOW2Entry.offsetMask == 0 {
                                    // Nothing allocated under this L1 entry: only a
                                    // backing file could show through.
                                    let probe = try change(0, self.header.hasExtendedL2 ? 0 : nil, covered)
                                    if probe.0 == 0, probe.1 ?? 0 == 0 { return group.end(nil) }
                                }
                                let table = try self.writableL2(index, current: existing)
                                let old = table.entry(slot)
                                let (entry, bitmap, release) = try change(old, self.header.hasExtendedL2 ? table.bitmap(slot) : nil,
                                                                          covered)
                                table.setEntry(slot, entry)
                                if let bitmap { table.setBitmap(slot, bitmap) }
                                self.dirtyL2[table.offset] = table
                                if release, let released = self.references(of: old) { self.pendingFrees.append(released) }
                                group.end(nil)
                            } catch {
                                if (error as? BlockError) == Self.retry { return attempt() }
                                group.end(error as? BlockError ?? .eio)
                            }
                        }
                    }
                }
            }
            attempt()
            cluster += 1
        }
        group.finishIssuing()
    }

    /// The subclusters of `cluster` that `[start, end)` covers, as the low
    /// 32 bits of an extended-L2 bitmap; all of them for a whole cluster,
    /// or for all of the part of it before the image's end. (A range from
    /// inside the cluster to the image's end covers the subclusters up to
    /// that end only, which may cut the last one short.)
    private func coveredSubclusters(of cluster: Int64, from start: Int64, to end: Int64) -> UInt64 {
        guard header.hasExtendedL2 else { return 0xffff_ffff }
        let clusterStart = cluster * Int64(header.clusterSize)
        let sub = Int64(header.subclusterSize)
        let first = (max(start, clusterStart) - clusterStart) / sub
        let stop = min(end, clusterStart + Int64(header.clusterSize))
        let last = (stop - clusterStart + sub - 1) / sub
        if first == 0, last == 32 || stop >= length { return 0xffff_ffff }
        return ((1 << UInt64(last - first)) - 1) << UInt64(first)
    }
}
