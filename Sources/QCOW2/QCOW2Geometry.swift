/// The sizes of an image's mapping, fixed while it is open: plain integers
/// for the lookup every request makes. Read through `header` instead, each
/// of them copied the whole header (retaining and releasing its extensions
/// and names): callgrind counted five copies per 4 KiB read.
struct QCOW2Geometry {
    let clusterBits: Int
    let clusterSize: Int64
    let subclusterSize: Int64
    /// log2 of the guest bytes one L2 table maps.
    let l2Bits: Int
    let extendedL2: Bool
    let externalData: Bool

    init(_ header: QCOW2Header) {
        clusterBits = Int(header.clusterBits)
        clusterSize = Int64(header.clusterSize)
        subclusterSize = Int64(header.subclusterSize)
        l2Bits = header.bytesPerL2.trailingZeroBitCount
        extendedL2 = header.hasExtendedL2
        externalData = header.incompatibleFeatures.contains(.externalDataFile)
    }

    var bytesPerL2: Int64 { 1 << Int64(l2Bits) }

    /// The L1 index of the table that maps guest `offset` (≥ 0).
    func l1Index(of offset: Int64) -> Int { Int(offset >> Int64(l2Bits)) }

    /// The cluster that holds guest or host `offset` (≥ 0).
    func cluster(of offset: Int64) -> Int64 { offset >> Int64(clusterBits) }

    /// Where `offset` (≥ 0) lies within its cluster.
    func offsetInCluster(_ offset: Int64) -> Int64 { offset & (clusterSize - 1) }

    /// The L2 slot of guest cluster `cluster` (≥ 0) within its table.
    func l2Slot(of cluster: Int64) -> Int { Int(cluster & (1 << Int64(l2Bits - clusterBits) - 1)) }
}
