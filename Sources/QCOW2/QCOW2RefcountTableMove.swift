/// A refcount table that has moved in memory (grown, at the end of the
/// file) while the header on disk still names the old one.
///
/// Why it is kept: the move's writes go to the end of the file, exactly
/// where a full disk fails them. Memory cannot go back (allocations made
/// since count on the new table), so the move stays pending and every
/// metadata writeback finishes it first; until it has, nothing that counts
/// on the new table reaches the disk.
struct QCOW2RefcountTableMove {
    /// Where the header's table is, and its clusters: freed once the
    /// header names the new one.
    var oldOffset: UInt64
    var oldClusters: Int64
    var newOffset: Int64
    var newClusters: Int64
}
