/// The overlap check before an L2 table changes in place.
extension QCOW2Driver {
    /// The other metadata that the cluster of the L2 table at `offset`
    /// holds, by QEMU's name for it, or nil when it holds none.
    ///
    /// COPIED on an L1 entry says its L2 table is this image's alone to
    /// change in place; a damaged or hostile entry can name the header, the
    /// L1 table itself or a refcount block instead, and writing the table
    /// back would overwrite them. QEMU checks every L2 writeback against
    /// the other metadata (its "cached" overlap checks); a table here is
    /// checked as it is about to change, which is never on a read or an
    /// overwrite of allocated data.
    func metadataOverlappingL2Table(at offset: UInt64) -> String? {
        let clusterSize = UInt64(header.clusterSize)
        let cluster = offset / clusterSize
        func covers(_ start: UInt64, _ length: UInt64) -> Bool {
            // (Offsets come from the image: a sum past 2^64 reaches its end.)
            let (last, past) = start.addingReportingOverflow(length &- 1)
            return length > 0 && start / clusterSize <= cluster && (past || cluster <= last / clusterSize)
        }
        if cluster == 0 { return "qcow2_header" }
        if covers(header.l1TableOffset, UInt64(l1.count) * 8) { return "active L1 table" }
        // In QEMU's order, which names the first when a cluster holds more.
        if let refcounter, covers(refcounter.tableOffset, UInt64(refcounter.table.count) * 8) {
            return "refcount table"
        }
        if header.snapshotCount > 0, covers(header.snapshotsOffset, UInt64(max(snapshotTableLength, 1))) {
            return "snapshot table"
        }
        if let refcounter, !refcounter.snapshotL1Clusters.isEmpty, refcounter.snapshotL1Clusters.contains(Int64(cluster)) {
            return "inactive L1 table"
        }
        if let refcounter, refcounter.blocks[cluster * clusterSize] != nil { return "refcount block" }
        if let directory = bitmapDirectory, covers(directory.offset, UInt64(directory.bytes.count)) {
            return "bitmap directory"
        }
        return nil
    }
}
