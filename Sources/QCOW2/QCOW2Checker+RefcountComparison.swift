import BlockLayer
import NIOCore

/// The second half of a check: the refcount structure itself, and the
/// stored refcounts against the references the walk over the metadata
/// counted, in qemu-img's order and words.
extension QCOW2Checker {
    /// Reads every refcount block and compares with what was counted.
    func compareRefcounts() -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        let perBlock = clustersPerBlock
        let tableBytes = Int(header.refcountTableClusters) * header.clusterSize
        return read(header.refcountTableOffset, tableBytes).flatMap { table in
            let reader = BigEndianReader(table)
            let fileClusters = (self.file.length + self.clusterSize - 1) / self.clusterSize
            let maxReferenced = (self.references.keys.max() ?? 0) + 1
            let clusters = max(fileClusters, maxReferenced)
            var chain = loop.makeSucceededVoidFuture()
            let comparedBlocks = Int((clusters + perBlock - 1) / perBlock)
            // Every block the table names is counted, as qemu-img counts
            // them, even where it describes no cluster in use.
            for block in 0..<table.count / 8 {
                let entry = reader.u64(at: block * 8)
                let offset = entry & ~UInt64(511)
                if entry & 511 != 0 {
                    // As qemu-img: an error only a rebuild mends, and the
                    // block is not counted; its refcounts are still compared.
                    self.report.corruptions += 1
                    self.report.refcountsNeedRebuild = true
                    self.note("ERROR refcount table entry \(block) has reserved bits set")
                }
                guard offset != 0 else { continue }
                // A block QEMU cannot read (reserved bits or not): its
                // clusters' refcounts are check errors (see compareCounts).
                let misaligned = offset % UInt64(self.clusterSize) != 0
                if misaligned || offset >= Self.unreachableOffset {
                    self.unreadableBlocks.insert(block)
                    if misaligned { self.misalignedBlocks[block] = offset }
                }
                if entry & 511 == 0 {
                    guard self.countBlock(block, at: offset, fileClusters: fileClusters) else { continue }
                } else if misaligned || offset / UInt64(self.clusterSize) >= UInt64(fileClusters) {
                    continue
                }
                guard block < comparedBlocks else { continue }
                // The whole block is read: refcounts past the clusters the
                // file and the metadata reach are not compared, as in QEMU,
                // but the COPIED check looks them up.
                chain = chain.flatMap {
                    self.read(offset, self.header.clusterSize).map { bytes in
                        bytes.withUnsafeBytes { raw in
                            for index in 0..<Int(perBlock) {
                                let value = QCOW2Refcounts.entry(raw, index: index, bits: self.header.refcountBits)
                                if value != 0 { self.stored[Int64(block) * perBlock + Int64(index)] = value }
                            }
                        }
                    }
                }
            }
            return chain.map {
                self.report.mismatchMessagesStart = self.report.messages.count
                self.compareCounts(below: clusters)
            }
        }
    }

    /// Checks where a refcount block lies and counts its reference, with
    /// qemu-img's errors; false when it is not to be read.
    private func countBlock(_ block: Int, at offset: UInt64, fileClusters: Int64) -> Bool {
        // As qemu-img: one error for a block that is misplaced, and no
        // reference counted for it.
        guard offset % UInt64(clusterSize) == 0 else {
            report.corruptions += 1
            note("ERROR refcount block \(block) is not cluster aligned; refcount table entry corrupted")
            return false
        }
        // In unsigned arithmetic: the offset may be anything up to 2^64.
        guard offset / UInt64(clusterSize) < UInt64(fileClusters) else {
            report.corruptions += 1
            report.blocksOutsideImage.append((block, offset, report.messages.count))
            note("ERROR refcount block \(block) is outside image")
            return false
        }
        reference(offset, length: clusterSize)
        // Everything else is counted by now: a block that is also a table,
        // data, or another entry's block must move, and only a rebuild
        // moves it (as qemu-img judges, block by block).
        let references = self.references[Int64(offset) / clusterSize] ?? 0
        if references != 1 {
            report.corruptions += 1
            report.refcountsNeedRebuild = true
            note("ERROR refcount block \(block) refcount=\(references)")
        }
        return true
    }

    /// Reads from here on fail (QEMU's largest request end is 2^63 less
    /// its largest alignment, 1 GiB); below, past the end of the file,
    /// they read zeroes.
    static let unreachableOffset: UInt64 = (1 << 63) - (1 << 30) - (2 << 20)

    /// Compares the stored refcounts of the clusters below `limit` with the
    /// references counted. A cluster whose block cannot be read is a check
    /// error instead, reported in cluster order among the rest, as qemu-img
    /// reports it.
    private func compareCounts(below limit: Int64) {
        let perBlock = clustersPerBlock
        var blocked = unreadableBlocks.sorted().map { block in
            (Int64(block) * perBlock..<Int64(block + 1) * perBlock).clamped(to: 0..<limit)
        }.filter { !$0.isEmpty }[...]
        var highest: Int64 = 0
        // Reports the unreadable clusters below `end`.
        func reportBlocked(below end: Int64) {
            while let range = blocked.first, range.lowerBound < end {
                if let event = corruptionEvent(at: range.lowerBound) { note(event) }
                let stop = min(range.upperBound, end)
                for cluster in range.lowerBound..<stop {
                    report.checkErrors += 1
                    note("Can't get refcount for cluster \(cluster): Input/output error")
                }
                if stop == range.upperBound {
                    blocked.removeFirst()
                } else {
                    blocked[blocked.startIndex] = stop..<range.upperBound
                }
            }
        }
        for cluster in Set(stored.keys.filter { $0 < limit }).union(references.keys).sorted() {
            reportBlocked(below: cluster)
            if let range = blocked.first, range.contains(cluster) { continue }
            let have = stored[cluster] ?? 0
            let want = UInt64(references[cluster] ?? 0)
            highest = cluster
            guard have != want else { continue }
            let mismatch = RefcountMismatch(cluster: cluster, stored: have, referenced: want)
            report.mismatches.append(mismatch)
            note(mismatch.message())
            if have < want {
                report.corruptions += 1
                if have == 0 { report.refcountsNeedRebuild = true }
            } else {
                report.leaks += 1
            }
        }
        reportBlocked(below: limit)
        report.imageEndOffset = (highest + 1) * clusterSize
        report.totalClusters = Int((guestSize + clusterSize - 1) / clusterSize)
    }

    func refcountReadable(_ cluster: Int64) -> Bool {
        unreadableBlocks.isEmpty || !unreadableBlocks.contains(Int(cluster / clustersPerBlock))
    }

    /// QEMU's corruption event for the first read of a misaligned block
    /// (once per open: it suppresses the rest), or nil.
    private func corruptionEvent(at cluster: Int64) -> String? {
        let block = Int(cluster / clustersPerBlock)
        guard !corruptionSignalled, let offset = misalignedBlocks[block] else { return nil }
        corruptionSignalled = true
        let what = "Refblock offset 0x\(String(offset, radix: 16)) unaligned (reftable index: \(block.alternateHex))"
        return openedForRepair
            ? "qcow2: Marking image as corrupt: \(what); further corruption events will be suppressed"
            : "qcow2: Image is corrupt: \(what); further non-fatal corruption events will be suppressed"
    }
}
