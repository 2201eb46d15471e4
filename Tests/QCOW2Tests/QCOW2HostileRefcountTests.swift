import BlockLayer
import NIOCore
import NIOEmbedded
#if canImport(Glibc)
import Glibc
#endif
@testable import QCOW2
import Testing

/// Refcount structures a hostile image can hold: refcounts for clusters no
/// offset can name, one block named twice, references far past the end,
/// and tables full of wrong COPIED flags. Each ends in an error or a
/// report, promptly, never a trap or gigabytes of memory (found by
/// fuzzing `strata img check` and `strata serve`).
@Suite struct QCOW2HostileRefcountTests {
    let loop = EmbeddedEventLoop()
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()

    struct Image {
        var bytes: [UInt8]
        var header: QCOW2Header

        mutating func setU64(_ value: UInt64, at offset: UInt64) {
            for index in 0..<8 { bytes[Int(offset) + index] = UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * index)) }
        }

        func u64(at offset: UInt64) -> UInt64 {
            (0..<8).reduce(UInt64(0)) { $0 << 8 | UInt64(bytes[Int(offset) + $1]) }
        }

        /// Appends a zeroed cluster and returns its offset.
        mutating func appendCluster() -> UInt64 {
            let offset = UInt64(bytes.count)
            bytes += [UInt8](repeating: 0, count: header.clusterSize)
            return offset
        }
    }

    func image(clusterBits: UInt32, refcountBits: Int, size: UInt64 = 64 << 20, preallocate: Bool = false) throws -> Image {
        var options = QCOW2ImageBuilder.Options(size: size)
        options.clusterBits = clusterBits
        options.refcountBits = refcountBits
        options.preallocateMetadata = preallocate
        let layout = try QCOW2ImageBuilder(options: options).build()
        var bytes = [UInt8](repeating: 0, count: Int(layout.fileLength))
        for (offset, data) in layout.writes { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
        return Image(bytes: bytes, header: layout.header)
    }

    func openDriver(_ file: RecordingFile, readOnly: Bool) throws -> (QCOW2Driver, BlockNode) {
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: readOnly))
        loop.run()
        return (try future.wait(), fileNode)
    }

    func backend(_ driver: QCOW2Driver, above fileNode: BlockNode) throws -> BlockBackend {
        let graph = graphs.all.last!
        let node = try graph.addNode(name: "image", driver: driver,
                                     children: [.init(name: "file", role: .image, node: fileNode)])
        return try graph.attachBackend(name: "test", to: node, perm: [.consistentRead, .write], shared: .all)
    }

    /// 2 MiB clusters with 1-bit refcounts: one block counts 2^45 bytes, so
    /// the last entry of a one-cluster table counts clusters just below 2^63.
    @Test func refcountsOfClustersPastTheLargestOffsetDoNotMoveTheAllocationEnd() throws {
        var image = try image(clusterBits: 21, refcountBits: 1)
        let block = image.appendCluster()
        image.bytes[image.bytes.count - 1] = 0x80  // the block's last cluster is in use
        let firstBlock = image.u64(at: image.header.refcountTableOffset)
        let cluster = Int(block) / image.header.clusterSize  // the new block counts itself as used
        image.bytes[Int(firstBlock) + cluster / 8] |= 1 << UInt8(cluster % 8)
        image.setU64(block, at: image.header.refcountTableOffset + 8 * 262_143)
        let file = RecordingFile(bytes: image.bytes)
        let (driver, fileNode) = try openDriver(file, readOnly: false)
        #expect(driver.refcounter!.allocationEnd < QCOW2Refcounter.hostOffsetLimit)
        let backend = try backend(driver, above: fileNode)
        var result: BlockError??
        [UInt8](repeating: 7, count: 4096).withUnsafeBytes { bytes in
            backend.write(at: 0, from: bytes) { result = .some($0) }
        }
        loop.run()
        let error = try #require(result, "the write did not complete")
        #expect(error == nil, "\(String(describing: error))")
    }

    @Test func theAllocatorStopsAtTheLargestOffset() throws {
        let image = try image(clusterBits: 16, refcountBits: 16)
        let (driver, _) = try openDriver(RecordingFile(bytes: image.bytes), readOnly: false)
        let refcounter = try #require(driver.refcounter)
        refcounter.allocationEnd = QCOW2Refcounter.hostOffsetLimit - refcounter.clusterSize
        #expect(throws: BlockError.self) { _ = try refcounter.claimAtEnd(2 * refcounter.clusterSize) }
        #expect(refcounter.allocationEnd == QCOW2Refcounter.hostOffsetLimit - refcounter.clusterSize, "unchanged")
    }

    /// 512-byte clusters: an 8 MiB table (QEMU's limit, and the most an
    /// open accepts) counts 128 GiB. Growing past it would write an image
    /// that no longer opens; the write fails with ENOSPC instead.
    @Test func theRefcountTableDoesNotGrowPastWhatAnOpenAccepts() throws {
        let image = try image(clusterBits: 9, refcountBits: 16)
        let (driver, _) = try openDriver(RecordingFile(bytes: image.bytes), readOnly: false)
        let refcounter = try #require(driver.refcounter)
        refcounter.table += [UInt64](repeating: 0, count: (1 << 20) - refcounter.table.count)
        refcounter.allocationEnd = Int64(1 << 20) * refcounter.perBlock * refcounter.clusterSize
        #expect(refcounter.needsLargerTable)
        var result: BlockError??
        driver.growRefcountTable { result = .some($0) }
        loop.run()
        let completed = try #require(result, "the grow did not complete")
        let error = try #require(completed, "the grow succeeded")
        #expect(error.description.contains("cannot grow further"), "\(error)")
        #expect(refcounter.table.count == 1 << 20)
    }

    /// A refcount block on top of an L2 table: every allocation would write
    /// counts over the table. A read-write open refuses it (reading is
    /// fine); an open for repair notes it for the rebuild.
    @Test func aRefcountBlockOnAnL2TableIsRefusedForWriting() throws {
        var image = try image(clusterBits: 16, refcountBits: 16, preallocate: true)
        let l2 = image.u64(at: image.header.l1TableOffset) & QCOW2Entry.offsetMask
        try #require(l2 != 0)
        image.setU64(l2, at: image.header.refcountTableOffset + 8)
        let file = RecordingFile(bytes: image.bytes)
        do {
            _ = try openDriver(file, readOnly: false)
            Issue.record("the open succeeded")
        } catch let error as BlockError {
            #expect(error.description.contains("overlaps other metadata"), "\(error)")
        }
        #expect(file.writes.isEmpty, "nothing written")
        _ = try openDriver(file, readOnly: true)
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let future = QCOW2Driver.open(file: try graph.addNode(name: "file", driver: file),
                                      options: QCOW2Options(readOnly: false, forRepair: true))
        loop.run()
        #expect(try future.wait().refcountDamage == .overlapsMetadata(l2))
    }

    @Test func aRefcountBlockNamedTwiceIsRefusedForWriting() throws {
        var image = try image(clusterBits: 16, refcountBits: 16)
        let first = image.u64(at: image.header.refcountTableOffset)
        for index in 1..<64 { image.setU64(first, at: image.header.refcountTableOffset + 8 * UInt64(index)) }
        let file = RecordingFile(bytes: image.bytes)
        #expect(throws: BlockError.self) { _ = try openDriver(file, readOnly: false) }
        do {
            _ = try openDriver(file, readOnly: false)
        } catch let error as BlockError {
            #expect(error.description.contains("named by more than one refcount table entry"), "\(error)")
        }
        _ = try openDriver(file, readOnly: true)  // reading needs no refcounts
    }

    /// An L2 entry 2^55 bytes in, and 1-bit refcount blocks with every bit
    /// set: the check reports the entry and compares only the refcounts of
    /// clusters the file holds.
    @Test func referencesFarPastTheEndAreReportedNotCounted() throws {
        var image = try image(clusterBits: 9, refcountBits: 1, size: 1 << 20, preallocate: true)
        let l2 = image.u64(at: image.header.l1TableOffset) & QCOW2Entry.offsetMask
        image.setU64(QCOW2Entry.copied | 1 << 55, at: l2)
        let firstBlock = image.u64(at: image.header.refcountTableOffset)
        for index in 0..<image.header.clusterSize { image.bytes[Int(firstBlock) + index] = 0xff }
        let file = RecordingFile(bytes: image.bytes)
        let (driver, fileNode) = try openDriver(file, readOnly: true)
        let checker = QCOW2Checker(driver: driver, file: fileNode)
        let future = checker.run()
        loop.run()
        let report = try future.wait()
        #expect(report.corruptions > 0)
        #expect(report.messages.contains { $0.contains("exceeding the end of the file by one cluster or more") })
        // Kept: the blocks that cover the file's clusters, whole (one block
        // holds 4,096 one-bit refcounts of 512-byte clusters).
        let fileClusters = (image.bytes.count + 511) / 512
        #expect(checker.stored.count <= fileClusters + 4096, "\(checker.stored.count) refcounts kept")
        #expect(report.mismatches.allSatisfy { $0.cluster <= fileClusters }, "compared only where the file is")
    }

    /// A refcount table of 100,000 entries naming one empty block, then as
    /// many naming none, in a file that answers reads at once as the page
    /// cache does. Counting referenced clusters (BLOCK_STATUS does, to tell
    /// a metadata-preallocated image) must not nest a call per entry: it
    /// did, and a hostile image overflowed the stack.
    @Test func countingReferencesOverAHugeRefcountTableKeepsTheStackFlat() throws {
        var image = try image(clusterBits: 9, refcountBits: 64)
        let block = image.appendCluster()
        let entries = 200_000
        var header = image.header
        header.refcountTableOffset = UInt64(image.bytes.count)
        header.refcountTableClusters = UInt32(entries * 8 / header.clusterSize)
        for _ in 0..<Int(header.refcountTableClusters) { _ = image.appendCluster() }
        for index in 0..<entries / 2 { image.setU64(block, at: header.refcountTableOffset + UInt64(index * 8)) }
        let file = RecordingFile(bytes: image.bytes)
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)
        var result: Result<Int64, BlockError>?
        // 64 refcounts per 512-byte block: every entry counts clusters below the end.
        QCOW2Refcounts.countReferenced(file: fileNode, header: header, endCluster: Int64(entries) * 64,
                                       limit: .max) { result = $0 }
        loop.run()
        #expect(try result?.get() == 0)
        #expect(file.reads.count == entries / 2 + 1, "the table, then the block for each entry naming it")
    }

    /// A file longer than 2^61 bytes (possible only sparse, near 2^63) is
    /// refused on open, before the sums that round its length up to whole
    /// clusters can overflow.
    @Test func aFileLongerThanAnyImageCanUseIsRefused() throws {
        let image = try image(clusterBits: 21, refcountBits: 16)
        let file = RecordingFile(bytes: image.bytes)
        file.apparentLength = .max - 4096
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: false))
        loop.run()
        let error = #expect(throws: QCOW2Error.self) { try future.wait() }
        #expect(error?.description.contains("larger than 2^61") == true, "\(String(describing: error))")
    }

    /// A refcount table naming blocks all over a sparse file: every block is
    /// held in memory while the image is open for writing, so 40 blocks of
    /// 64 KiB are refused under a 2 MiB limit before any is read (a hostile
    /// table naming a million blocks of 2 MiB ended in the OOM killer), and
    /// loaded under a 4 MiB one.
    @Test func refcountBlocksThatWouldNotFitInMemoryAreRefusedBeforeLoading() throws {
        var image = try image(clusterBits: 16, refcountBits: 16)
        let clusterSize = UInt64(image.header.clusterSize)
        let firstFree = (UInt64(image.bytes.count) + clusterSize - 1) / clusterSize * clusterSize
        for index in 1...39 {
            image.setU64(firstFree + UInt64(index) * 64 * clusterSize, at: image.header.refcountTableOffset + 8 * UInt64(index))
        }
        let file = RecordingFile(bytes: image.bytes)
        file.apparentLength = 1 << 40
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)

        let refused = QCOW2Refcounter.load(file: fileNode, header: image.header, memoryLimit: 2 << 20)
        loop.run()
        let error = #expect(throws: BlockError.self) { try refused.wait() }
        #expect(error?.errno == ENOMEM)
        #expect(error?.description.contains("would load 40 refcount blocks, 3 MiB, more than the 2 MiB") == true,
                "\(String(describing: error))")
        #expect(file.reads.count == 1, "only the table is read")

        let loaded = QCOW2Refcounter.load(file: fileNode, header: image.header, memoryLimit: 4 << 20)
        loop.run()
        let refcounter = try loaded.wait()
        #expect(refcounter.blocks.count == 40)
        #expect(refcounter.refcount(0) == 1, "the header's cluster, counted by the first block")
        #expect(QCOW2Refcounter.defaultMemoryLimit > 0)
    }

    /// A table full of wrong COPIED flags is rewritten with one write per
    /// table cluster, and the flags are right afterwards.
    @Test func copiedFlagsAreRepairedOneTableClusterAtATime() throws {
        var image = try image(clusterBits: 12, refcountBits: 16, size: 4 << 20, preallocate: true)
        let l2 = image.u64(at: image.header.l1TableOffset) & QCOW2Entry.offsetMask
        for slot in 0..<(image.header.clusterSize / 8) {
            let entry = l2 + UInt64(slot * 8)
            image.setU64(image.u64(at: entry) & ~QCOW2Entry.copied, at: entry)
        }
        let file = RecordingFile(bytes: image.bytes)
        let (driver, fileNode) = try openDriver(file, readOnly: false)
        let found = QCOW2Checker(driver: driver, file: fileNode).run()
        loop.run()
        let fixes = try found.wait().copiedFixes
        #expect(fixes.count == image.header.clusterSize / 8)
        file.forget()
        let repaired = driver.repairEntries(fixes, file: fileNode)
        loop.run()
        try repaired.wait()
        #expect(file.writes.count == 1 && file.writes.first?.offset == Int64(l2), "\(file.writes)")
        let checked = QCOW2Checker(driver: driver, file: fileNode).run()
        loop.run()
        #expect(try checked.wait().corruptions == 0)
    }

    /// An L1 table of 20,000 entries that all name one L2 table full of
    /// entries with reserved bits: the references a repair needs are all
    /// counted, across more than one step of the walk, and no message is
    /// kept for them (a read-write open of a dirty image repairs this way,
    /// and with 4M entries the messages alone were tens of gigabytes).
    @Test func countingReferencesForARepairKeepsNoMessages() throws {
        let entries = 20_000
        #expect(entries > QCOW2Checker.l1EntriesPerStep)
        // 512-byte clusters: an L2 table maps 64 of them, 32 KiB.
        var image = try image(clusterBits: 9, refcountBits: 16, size: UInt64(entries) << 15)
        let l2 = image.appendCluster()
        for slot in 0..<64 { image.setU64(2, at: l2 + UInt64(slot * 8)) }
        for index in 0..<entries { image.setU64(l2, at: image.header.l1TableOffset + UInt64(index * 8)) }
        let file = RecordingFile(bytes: image.bytes)
        let (driver, fileNode) = try openDriver(file, readOnly: true)
        let checker = QCOW2Checker(driver: driver, file: fileNode)
        let counted = checker.expectedRefcounts()
        loop.run()
        #expect(try counted.wait()[Int64(l2) / 512] == entries)
        #expect(checker.report.corruptions == entries * 64)
        #expect(checker.report.messages.isEmpty)
    }
}
