import BlockLayer

/// Data I/O in flight, and freed clusters on their way back to the
/// allocator.
///
/// A discard frees a cluster once the tables that dropped it are on disk,
/// which does not wait for reads and writes that looked it up before: the
/// refcounter keeps it from the allocator until they end (counted by
/// epoch, see `QCOW2IOEpochs`, or per cluster for ranges lent out for
/// `sendfile`), so another guest range's data never reaches a read of this
/// one, nor a late write of this one the other's.
/// `sendfile` adds a twist: the socket keeps references to the page cache
/// pages, not copies, until the client has read them, so a freed cluster's
/// bytes are punched out of the file before it is handed out again (see
/// `free`).
extension QCOW2Driver: CachedFileExtentHolder, InFlightRequestOwner {
    /// The host clusters under `[host, host + length)`, `length` > 0.
    func hostClusters(at host: Int64, length: Int64) -> ClosedRange<Int64> {
        let clusterBits = Int64(geometry.clusterBits)
        return host >> clusterBits...(host + length - 1) >> clusterBits
    }

    /// Whether a discard can free data clusters while I/O on them is in
    /// flight, so the I/O must be counted: a writable image with its data
    /// in its own file (an external data file maps guest offsets one to one).
    var dataClustersCanBeFreed: Bool { refcounter != nil && !externalData }

    /// Counts one data read or in-place write as in flight, when
    /// `dataClustersCanBeFreed`. Returns what to pass to `endUse`.
    func beginUse() -> UInt64? {
        guard dataClustersCanBeFreed else { return nil }
        return refcounter!.inFlight.begin()
    }

    /// `completion`, wrapped to end a use counted now (see `beginUse`)
    /// before it runs; `completion` itself when nothing needs counting.
    func countingUse(_ completion: @escaping BlockCompletion) -> BlockCompletion {
        guard let epoch = beginUse() else { return completion }
        let use = idleDataUses.popLast() ?? InFlightRequest()
        use.begin(owner: self, tag: epoch, completion: completion)
        return { error in use.end(error) }
    }

    /// A use counted by `countingUse` has ended; its record is free again.
    public func inFlightRequestEnded(_ request: InFlightRequest, tag epoch: UInt64) {
        endUse(epoch)
        idleDataUses.append(request)
    }

    func endUse(_ epoch: UInt64?) {
        guard let epoch, let refcounter else { return }
        let idle = refcounter.inFlight.end(epoch)
        if !idle.isEmpty { punch(idle) }
    }

    /// Lends a data range for `sendfile` (see `cachedFileExtent`): its
    /// clusters stay out of the allocator until `release`.
    func lend(_ extent: inout CachedFileExtent) {
        guard let refcounter else { return }
        refcounter.hasLent = true
        for cluster in hostClusters(at: extent.offset, length: Int64(extent.length)) {
            refcounter.lentClusters[cluster, default: 0] += 1
        }
        extent.holder = self
    }

    /// A data range lent for `sendfile` has gone out.
    public func release(_ extent: CachedFileExtent) {
        guard let refcounter else { return }
        var idle: [Int64] = []
        for cluster in hostClusters(at: extent.offset, length: Int64(extent.length)) {
            guard let count = refcounter.lentClusters[cluster] else { continue }
            if count > 1 {
                refcounter.lentClusters[cluster] = count - 1
                continue
            }
            refcounter.lentClusters[cluster] = nil
            if refcounter.awaitingReturn.remove(cluster) != nil { idle.append(cluster) }
        }
        punch(idle)
    }

    /// Drops the references of `ranges`, which the tables on disk no longer
    /// hold. A cluster left with none has its bytes punched out of the file
    /// once no I/O uses it (the file node does so with discard=unmap, as
    /// QEMU passes discards down), and only then goes back to the
    /// allocator: the page cache drops its pages, so a reply still queued
    /// in a socket keeps the old bytes while the next owner writes to fresh
    /// pages.
    func free(_ ranges: [(UInt64, Int64)]) {
        guard let refcounter else { return }
        var freed: [Int64] = []
        for (host, length) in ranges where length > 0 {
            for cluster in hostClusters(at: Int64(host), length: length) where refcounter.release(cluster) {
                refcounter.awaitingPunch.insert(cluster)
                freed.append(cluster)
            }
        }
        punch(refcounter.inFlight.retire(freed))
    }

    /// Punches free clusters that no I/O holds out of the image file,
    /// contiguous ones together, then hands them to the allocator (whether
    /// or not the file could punch). Lent ones wait for `release`.
    private func punch(_ clusters: [Int64]) {
        guard !clusters.isEmpty, let refcounter else { return }
        var idle = clusters
        if !refcounter.lentClusters.isEmpty {
            idle.removeAll { cluster in
                guard refcounter.lentClusters[cluster] != nil else { return false }
                refcounter.awaitingReturn.insert(cluster)
                return true
            }
        }
        let clusterSize = geometry.clusterSize
        let sorted = idle.sorted()
        var start = 0
        while start < sorted.count {
            var end = start + 1
            while end < sorted.count, sorted[end] == sorted[end - 1] + 1 { end += 1 }
            let range = sorted[start]...sorted[end - 1]
            // Once ranges have gone out by sendfile, whatever the discard
            // option: a reply sent may still sit in a socket, referencing
            // these pages.
            punchesInFlight += 1
            file.discard(at: range.lowerBound * clusterSize, length: Int64(range.count) * clusterSize,
                         evenIfIgnored: refcounter.hasLent) { _ in
                for cluster in range { self.refcounter?.finishPunch(cluster) }
                self.punchesInFlight -= 1
                if self.punchesInFlight == 0, !self.punchWaiters.isEmpty {
                    let waiters = self.punchWaiters
                    self.punchWaiters = []
                    waiters.forEach { $0() }
                }
            }
            start = end
        }
    }
}
