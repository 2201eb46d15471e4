import BlockLayer

/// Host clusters with data I/O in flight. A discard frees a cluster once
/// the tables that dropped it are on disk, which does not wait for reads
/// and writes that looked it up before: the refcounter then keeps it from
/// the allocator until they end, so another guest range's data never
/// reaches a read of this one, nor a late write of this one the other's.
extension QCOW2Driver: CachedFileExtentHolder {
    /// Counts the host clusters under `[host, host + length)` as in use,
    /// when anything could free them: a writable image with its data in
    /// its own file (an external data file maps guest offsets one to one).
    /// Returns what to pass to `endUse`.
    func beginUse(host: Int64, length: Int64) -> ClosedRange<Int64>? {
        guard let refcounter, !externalData, length > 0 else { return nil }
        let clusterSize = Int64(header.clusterSize)
        let clusters = host / clusterSize...(host + length - 1) / clusterSize
        for cluster in clusters { refcounter.beginUse(cluster) }
        return clusters
    }

    func endUse(_ clusters: ClosedRange<Int64>?) {
        guard let clusters, let refcounter else { return }
        for cluster in clusters { refcounter.endUse(cluster) }
    }

    /// A data range lent for `sendfile` (see `cachedFileExtent`) has gone out.
    public func release(_ extent: CachedFileExtent) {
        let clusterSize = Int64(header.clusterSize)
        endUse(extent.offset / clusterSize...(extent.offset + Int64(extent.length) - 1) / clusterSize)
    }
}
