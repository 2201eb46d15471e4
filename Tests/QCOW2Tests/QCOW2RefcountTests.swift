import BlockLayer
@testable import QCOW2
import Testing

/// Refcount packing, allocation and the image builder's layout.
@Suite struct QCOW2RefcountTests {
    @Test(arguments: [1, 2, 4, 8, 16, 32, 64])
    func entriesRoundTripAtEveryWidth(bits: Int) {
        var block = [UInt8](repeating: 0, count: 512)
        let max: UInt64 = bits == 64 ? .max : (1 << UInt64(bits)) - 1
        let count = 512 * 8 / bits
        block.withUnsafeMutableBytes { raw in
            for index in 0..<count { QCOW2Refcounter.store(raw, index: index, bits: bits, value: UInt64(index) & max) }
        }
        block.withUnsafeBytes { raw in
            for index in 0..<count {
                #expect(QCOW2Refcounts.entry(raw, index: index, bits: bits) == UInt64(index) & max)
            }
        }
        // The builder's refcount blocks pack the same way, piece by piece.
        let blocks = QCOW2LayoutRegion(offset: 0, length: 1024, content: .refcounts(count: UInt64(count + 3), bits: bits))
        let built = blocks.bytes(at: 0, count: 512) + blocks.bytes(at: 512, count: 512)
        built.withUnsafeBytes { raw in
            let counts = (0..<2 * count).map { QCOW2Refcounts.entry(raw, index: $0, bits: bits) }
            #expect(counts == [UInt64](repeating: 1, count: count + 3) + [UInt64](repeating: 0, count: count - 3))
        }
    }

    func refcounter(bits: Int = 16, clusterBits: UInt32 = 9, fileLength: Int64 = 4 * 512) -> QCOW2Refcounter {
        var options = QCOW2ImageBuilder.Options(size: 1 << 20)
        options.clusterBits = clusterBits
        options.refcountBits = bits
        let layout = try! QCOW2ImageBuilder(options: options).build()
        return QCOW2Refcounter(header: layout.header, table: [0], fileLength: fileLength)
    }

    @Test func allocationCreatesSelfDescribingBlocks() throws {
        let counter = refcounter()
        let first = try counter.allocateCluster()
        // The data took cluster 4; the refcount block it needed went right
        // after it (cluster 5) and counts itself.
        #expect(first == 4 * 512)
        #expect(counter.table[0] == 5 * 512)
        #expect(counter.refcount(4) == 1)
        #expect(counter.refcount(5) == 1)
        #expect(counter.metadataClusters.contains(5))
        #expect(counter.dirtyBlocks.count == 1)
        #expect(counter.dirtyTableClusters == [0])
        let second = try counter.allocateCluster()
        #expect(second == 6 * 512)
    }

    @Test func freedClustersAreAllocatedAgainLowestFirst() throws {
        let counter = refcounter()
        let clusters = try (0..<4).map { _ in Int64(try counter.allocateCluster()) / 512 }
        #expect(clusters == [4, 6, 7, 8])  // 5 is the refcount block
        counter.release(clusters[2])
        counter.release(clusters[1])
        #expect(counter.refcount(clusters[1]) == 0)
        #expect(Int64(try counter.allocateCluster()) / 512 == clusters[1])
        #expect(Int64(try counter.allocateCluster()) / 512 == clusters[2])
        #expect(counter.refcount(clusters[2]) == 1)
        // Nothing is free below the end any more: back to appending.
        #expect(Int64(try counter.allocateCluster()) / 512 == 9)
    }

    @Test func aClusterFreedDuringItsIOIsNotReusedUntilTheIOEnds() throws {
        let counter = refcounter()
        let clusters = try (0..<3).map { _ in Int64(try counter.allocateCluster()) / 512 }
        let epoch = counter.inFlight.begin()
        #expect(counter.release(clusters[0]))
        counter.awaitingPunch.insert(clusters[0])
        #expect(counter.inFlight.retire([clusters[0]]).isEmpty, "held by the I/O in flight")
        #expect(Int64(try counter.allocateCluster()) / 512 == 8)
        #expect(counter.inFlight.end(epoch) == [clusters[0]])
        #expect(Int64(try counter.allocateCluster()) / 512 == 9, "not before its hole is punched")
        counter.finishPunch(clusters[0])
        #expect(Int64(try counter.allocateCluster()) / 512 == clusters[0])
    }

    @Test func refcountsRefuseUnderflowAndOverflow() throws {
        let counter = refcounter(bits: 1)
        let cluster = try counter.allocateCluster()
        #expect(throws: BlockError.self) { try counter.adjust(Int64(cluster) / 512, by: 1) }
        try counter.adjust(Int64(cluster) / 512, by: -1)
        #expect(throws: BlockError.self) { try counter.adjust(Int64(cluster) / 512, by: -1) }
    }

    @Test func aFullTableIsReportedNotOverrun() throws {
        // 512-byte clusters, 16-bit refcounts: one block covers 256 clusters
        // and a one-entry table covers 128 KiB.
        let counter = refcounter(fileLength: 255 * 512)
        #expect(counter.needsLargerTable)
        let full = refcounter(fileLength: 300 * 512)
        #expect(throws: BlockError.self) { _ = try full.allocateCluster() }
    }

    @Test(arguments: [(UInt64(64) << 20, UInt32(16), 16, false), (UInt64(3) << 30, 9, 1, false),
                      (UInt64(100) << 20, 12, 16, true), (UInt64(10) << 30, 17, 64, false)])
    func builtHeadersParseBackWithTheirOptions(size: UInt64, clusterBits: UInt32, bits: Int, preallocate: Bool) throws {
        var options = QCOW2ImageBuilder.Options(size: size)
        options.clusterBits = clusterBits
        options.refcountBits = bits
        options.preallocateMetadata = preallocate
        options.lazyRefcounts = true
        let layout = try QCOW2ImageBuilder(options: options).build()
        let header = try QCOW2Header.parse(layout.writes[0].bytes + [UInt8](repeating: 0, count: 1 << clusterBits))
        #expect(header.size == size)
        #expect(header.clusterBits == clusterBits)
        #expect(header.refcountBits == bits)
        #expect(header.compatibleFeatures.contains(.lazyRefcounts))
        #expect(Int64(header.l1Size) >= header.l1EntriesNeeded)
        // Every write lies inside the file and none overlaps another.
        let ranges = layout.writes.map { ($0.offset, $0.offset + UInt64($0.bytes.count)) }.sorted { $0.0 < $1.0 }
        for (a, b) in zip(ranges, ranges.dropFirst()) { #expect(a.1 <= b.0) }
        #expect((ranges.last?.1 ?? 0) <= layout.fileLength)
    }

    @Test func incompatibleOptionsAreRefused() {
        var v2 = QCOW2ImageBuilder.Options(size: 1 << 20)
        v2.version = 2
        v2.lazyRefcounts = true
        #expect(throws: QCOW2ImageBuilder.BuildError.self) { try QCOW2ImageBuilder(options: v2).build() }
        var extended = QCOW2ImageBuilder.Options(size: 1 << 20)
        extended.extendedL2 = true
        extended.clusterBits = 12
        #expect(throws: QCOW2ImageBuilder.BuildError.self) { try QCOW2ImageBuilder(options: extended).build() }
    }
}
