import BlockLayer
import NIOCore
import NIOEmbedded
@testable import QCOW2
import Testing

/// `check -r all`'s refcount rebuild: where the new table and blocks go,
/// what they count, and a driver that cannot load its refcounts becoming
/// writable once they are rebuilt.
@Suite struct QCOW2RefcountRebuildTests {
    func plan(_ references: [Int64: Int], occupied: Set<Int64> = [], clusterSize: Int64 = 65536,
              bits: Int = 16) throws -> QCOW2RefcountRebuild {
        try QCOW2RefcountRebuild(references: references, occupied: occupied.union(references.keys),
                                 clusterSize: clusterSize, refcountBits: bits)
    }

    func counts(_ clusters: Range<Int64>) -> [Int64: Int] {
        Dictionary(uniqueKeysWithValues: clusters.map { ($0, 1) })
    }

    /// The old table and block (clusters 1 and 2) stay untouched until the
    /// header moves, so the new ones go past them; in the new counts they
    /// are free.
    @Test func theNewStructureAvoidsTheOldOneAndFreesIt() throws {
        let rebuild = try plan([0: 1, 3: 1, 4: 1, 5: 2], occupied: [1, 2])
        #expect(rebuild.blocks == [0: 6])
        #expect((rebuild.tableStart, rebuild.tableClusters) == (7, 1))
        #expect(rebuild.refcounts == [0: 1, 3: 1, 4: 1, 5: 2, 6: 1, 7: 1])
        let block = try #require(rebuild.blockBytes[6])
        #expect(Array(block[0..<16]) == [0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 2, 0, 1, 0, 1])
        #expect(Array(rebuild.tableBytes[0..<8]) == [0, 0, 0, 0, 0, 6, 0, 0])
        #expect(rebuild.tableBytes.count == 65536)
    }

    /// Holes below the end are used first, as qemu-img places them.
    @Test func holesAreFilledLowestFirst() throws {
        let rebuild = try plan([0: 1, 3: 1])
        #expect(rebuild.blocks == [0: 1])
        #expect(rebuild.tableStart == 2)
    }

    /// 512-byte clusters with 16-bit refcounts: 256 clusters per block.
    @Test func everyCountedRangeGetsABlock() throws {
        let rebuild = try plan(counts(0..<300), clusterSize: 512)
        #expect(rebuild.blocks == [0: 300, 1: 301])
        #expect(rebuild.tableStart == 302)
        #expect(rebuild.refcounts == counts(0..<303))
    }

    /// The table lands in a range no block covers yet: that range gets a
    /// block too, and the table names it.
    @Test func aTableInAnUncoveredRangeGetsItsBlock() throws {
        let rebuild = try plan(counts(0..<255), clusterSize: 512)
        #expect(rebuild.blocks == [0: 255, 1: 257])
        #expect(rebuild.tableStart == 256)
        #expect(rebuild.refcounts == counts(0..<258))
        #expect(Array(rebuild.tableBytes[8..<16]) == [0, 0, 0, 0, 0, 2, 2, 0])  // 257 * 512
    }

    /// A table too small for every block is given back and a larger one
    /// taken: a 512-byte table cluster names 64 blocks, and here the first
    /// table lands in range 64, which needs a 65th block.
    @Test func aTableOutgrownByItsBlocksIsReplaced() throws {
        let rebuild = try plan(counts(0..<(64 * 256 - 64)), clusterSize: 512)
        #expect(rebuild.blocks[64] == 16385)
        #expect((rebuild.tableStart, rebuild.tableClusters) == (16386, 2))
        #expect(rebuild.refcounts[16384] == nil, "the first table's cluster is free again")
        let blocks = Set(rebuild.blocks.values)
        for cluster in rebuild.tableStart..<rebuild.tableStart + 2 {
            #expect(!blocks.contains(cluster))
            #expect(rebuild.blocks[cluster / 256] != nil, "the table's range has a block")
        }
        let expected = rebuild.refcounts.count
        #expect(expected == 64 * 256 - 64 + rebuild.blocks.count + 2, "nothing counted twice, the first table freed")
    }

    @Test func countsTheWidthCannotHoldAreRefused() {
        #expect(throws: BlockError.self) { _ = try plan([0: 1, 5: 2], bits: 1) }
    }

    // MARK: the driver

    let loop = EmbeddedEventLoop()
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()

    func openDriver(_ file: RecordingFile, forRepair: Bool) throws -> (QCOW2Driver, BlockNode) {
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: false, forRepair: forRepair))
        loop.run()
        return (try future.wait(), fileNode)
    }

    func check(_ driver: QCOW2Driver, _ fileNode: BlockNode) throws -> QCOW2Checker.Report {
        let future = QCOW2Checker(driver: driver, file: fileNode).run()
        loop.run()
        return try future.wait()
    }

    /// A table moved past the end of the file: a read-write open refuses
    /// the image, an open for repair does not, and once rebuilt the driver
    /// allocates and the check is clean.
    @Test func aLostTableIsRebuiltOnlyWhenOpenedForRepair() throws {
        let layout = try QCOW2ImageBuilder(options: .init(size: 64 << 20)).build()
        var bytes = [UInt8](repeating: 0, count: Int(layout.fileLength))
        for (offset, data) in layout.writes { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
        for index in 0..<8 { bytes[48 + index] = index == 3 ? 0x40 : 0 }  // refcount_table_offset = 1 GiB
        let file = RecordingFile(bytes: bytes)
        #expect(throws: BlockError.self) { _ = try openDriver(file, forRepair: false) }
        let (driver, fileNode) = try openDriver(file, forRepair: true)
        #expect(driver.refcountDamage == .tablePastEnd)
        #expect(driver.refcounter == nil, "nothing may be allocated before the rebuild")
        #expect(try check(driver, fileNode).corruptions > 0)

        let rebuilt = driver.rebuildRefcounts(file: fileNode)
        loop.run()
        _ = try rebuilt.wait()
        #expect(driver.refcountDamage == nil)
        #expect(driver.header.refcountTableOffset < UInt64(fileNode.length))
        let report = try check(driver, fileNode)
        #expect(report.corruptions == 0 && report.leaks == 0, "\(report.messages)")

        let node = try graphs.all.last!.addNode(name: "image", driver: driver,
                                                 children: [.init(name: "file", role: .image, node: fileNode)])
        let backend = try graphs.all.last!.attachBackend(name: "test", to: node, perm: [.consistentRead, .write], shared: .all)
        var result: BlockError??
        [UInt8](repeating: 7, count: 65536).withUnsafeBytes { data in
            backend.write(at: 1 << 20, from: data) { result = .some($0) }
        }
        loop.run()
        #expect(try #require(result, "the write did not complete") == nil)
        var flushed: BlockError??
        backend.flush { flushed = .some($0) }
        loop.run()
        #expect(try #require(flushed) == nil)
        let after = try check(driver, fileNode)
        #expect(after.corruptions == 0 && after.leaks == 0 && after.allocatedClusters == 1, "\(after.messages)")
    }
}
