import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Zero writes and discards, whole clusters at a time: the zero flag (with
/// or without keeping the allocation) or an unallocated entry, and the
/// references freed once the changed tables are on disk.
extension QCOW2Driver {
    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                            completion: @escaping BlockCompletion) {
        if let refusal = changeRefusal { return completion(refusal) }
        guard header.version >= 3 || header.hasExtendedL2 else { return completion(.enotsup) }
        let clusterSize = Int64(header.clusterSize)
        guard offset % clusterSize == 0, length % clusterSize == 0 || offset + length == self.length else {
            return completion(.enotsup)
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
    /// unless the request may unmap it.
    private func markZero(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                          completion: @escaping BlockCompletion) {
        changeClusters(from: offset, length: length, completion: completion) { entry, bitmap in
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
        changeClusters(from: offset, length: length, completion: completion) { _, _ in
            if self.header.hasExtendedL2 { return (0, zero ? 0xffff_ffff_0000_0000 : 0, true) }
            return (zero ? QCOW2Entry.zeroFlag : 0, nil, true)
        }
    }

    /// Rewrites the entries of whole clusters; `change` returns the new
    /// entry, the new bitmap (extended L2) and whether the old host cluster
    /// is released.
    private func changeClusters(from offset: Int64, length: Int64, completion: @escaping BlockCompletion,
                                change: @escaping (UInt64, UInt64?) -> (UInt64, UInt64?, Bool)) {
        let clusterSize = Int64(header.clusterSize)
        let group = PendingGroup(completion: completion)
        var cluster = offset / clusterSize
        let last = (offset + length - 1) / clusterSize
        while cluster <= last {
            let current = cluster
            let index = Int(current * clusterSize / header.bytesPerL2)
            let slot = Int(current % Int64(header.l2Entries))
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
                                    let probe = change(0, self.header.hasExtendedL2 ? 0 : nil)
                                    if probe.0 == 0, probe.1 ?? 0 == 0 { return group.end(nil) }
                                }
                                let table = try self.writableL2(index, current: existing)
                                let old = table.entry(slot)
                                let (entry, bitmap, release) = change(old, self.header.hasExtendedL2 ? table.bitmap(slot) : nil)
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
}
