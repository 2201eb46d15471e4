@testable import QCOW2
import Testing

/// The geometry's shifts and masks against the header's divisions, which
/// say the same thing the slow way, for every cluster size QEMU accepts.
@Suite struct QCOW2GeometryTests {
    @Test(arguments: [false, true])
    func shiftsAndMasksAgreeWithTheHeaderDivisions(extendedL2: Bool) throws {
        var header = try QCOW2Header.parse(QCOW2HeaderTests().defaultHeader())
        if extendedL2 { header.incompatibleFeatures.insert(.extendedL2) }
        var random = SplitMix64(seed: 7)
        for bits in QCOW2Header.minClusterBits...QCOW2Header.maxClusterBits {
            header.clusterBits = bits
            let geometry = QCOW2Geometry(header)
            let clusterSize = Int64(header.clusterSize)
            #expect(geometry.bytesPerL2 == header.bytesPerL2)
            for _ in 0..<200 {
                let offset = Int64(random.next() >> 8)  // up to 2^56
                #expect(geometry.cluster(of: offset) == offset / clusterSize)
                #expect(geometry.offsetInCluster(offset) == offset % clusterSize)
                #expect(geometry.l1Index(of: offset) == Int(offset / header.bytesPerL2))
                #expect(geometry.l2Slot(of: offset / clusterSize) == Int(offset / clusterSize % Int64(header.l2Entries)))
            }
        }
    }
}
