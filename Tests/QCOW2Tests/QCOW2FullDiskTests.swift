import BlockLayer
import NIOCore
import NIOEmbedded
#if canImport(Glibc)
import Glibc
#endif
@testable import QCOW2
import Testing

/// A disk that fills up under a qcow2 image opened for writing: requests
/// fail with an error, and whatever the disk took stays a consistent image,
/// whether room comes back or not.
@Suite struct QCOW2FullDiskTests {
    let loop = EmbeddedEventLoop()
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()

    /// The image in `file`, over `backing` (raw) when given.
    func open(_ file: RecordingFile, readOnly: Bool,
              backing: RecordingFile? = nil) throws -> (QCOW2Driver, BlockNode, BlockBackend) {
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: readOnly))
        loop.run()
        let driver = try future.wait()
        var children: [BlockGraph.ChildSpec] = [.init(name: "file", role: .image, node: fileNode)]
        if let backing {
            let baseNode = try graph.addNode(name: "base", driver: backing, options: BlockNodeOptions(readOnly: true))
            children.append(.init(name: "backing", role: .backing, node: baseNode))
        }
        let node = try graph.addNode(name: "image", driver: driver, options: BlockNodeOptions(readOnly: readOnly),
                                     children: children)
        let perm: BlockPermission = readOnly ? .consistentRead : [.consistentRead, .write]
        return (driver, fileNode, try graph.attachBackend(name: "test", to: node, perm: perm, shared: .all))
    }

    func write(_ backend: BlockBackend, _ data: [UInt8], at offset: Int64) -> BlockError? {
        var failure: BlockError??
        data.withUnsafeBytes { backend.write(at: offset, from: $0) { failure = .some($0) } }
        loop.run()
        return failure ?? BlockError(errno: ETIMEDOUT, "the write never completed")
    }

    func flush(_ backend: BlockBackend) -> BlockError? {
        var failure: BlockError??
        backend.flush { failure = .some($0) }
        loop.run()
        return failure ?? BlockError(errno: ETIMEDOUT, "the flush never completed")
    }

    func read(_ backend: BlockBackend, count: Int, at offset: Int64) -> (BlockError?, [UInt8]) {
        var data = [UInt8](repeating: 0, count: count)
        var failure: BlockError?
        data.withUnsafeMutableBytes { backend.read(at: offset, into: $0) { failure = $0 } }
        loop.run()
        return (failure, data)
    }

    /// The image on disk, reopened, holds `pattern(i)` in each of the first
    /// `blocks` 4 KiB guest blocks.
    func expectReadBack(_ file: RecordingFile, blocks: Int) throws {
        let (_, _, reopened) = try open(RecordingFile(bytes: file.bytes), readOnly: true)
        for index in 0..<blocks {
            let (failure, data) = read(reopened, count: 4096, at: Int64(index) * 4096)
            #expect(failure == nil && data == Self.pattern(index), "guest block \(index)")
        }
    }

    /// What `qemu-img check` would find in the bytes on disk now.
    func checkOnDisk(_ file: RecordingFile) throws -> QCOW2Checker.Report {
        let (driver, fileNode, _) = try open(RecordingFile(bytes: file.bytes), readOnly: true)
        let future = QCOW2Checker(driver: driver, file: fileNode).run()
        loop.run()
        return try future.wait()
    }

    static func pattern(_ index: Int) -> [UInt8] {
        [UInt8](repeating: UInt8(truncatingIfNeeded: index &* 37 &+ 1), count: 4096)
    }

    /// 512-byte clusters and 16-bit refcounts: the one-cluster refcount
    /// table covers 8 MiB of file, so writing 8 MiB makes it grow, and the
    /// grown table goes at the end of the file, where a full disk fails it.
    /// The growth used to move the table in memory before its writes:
    /// after they failed, later flushes wrote refcounts into a table the
    /// header did not name, and reported success (refcount 0 for clusters
    /// in use: QEMU would hand them out again over guest data).
    @Test func aRefcountTableGrowthThatHitsAFullDiskIsFinishedOnceThereIsRoom() throws {
        var options = QCOW2ImageBuilder.Options(size: 32 << 20)
        options.clusterBits = 9
        let file = try RecordingFile(image: options)
        let (driver, _, backend) = try open(file, readOnly: false)
        let oldTable = driver.header.refcountTableOffset

        // The disk is full from where the grown table will go: the end of
        // the file when the table covers no more than 16 clusters past it.
        let refcounter = driver.refcounter!
        file.writeLimit = (Int64(refcounter.table.count) * refcounter.perBlock - 16) * refcounter.clusterSize
        var written = 0
        var failed: BlockError?
        while failed == nil {
            failed = write(backend, Self.pattern(written), at: Int64(written) * 4096)
            if failed == nil { written += 1 }
            try #require(written < 4096, "no write failed")
        }
        #expect(failed?.errno == ENOSPC, "\(String(describing: failed))")
        #expect(try QCOW2Header.parse(file.bytes).refcountTableOffset == oldTable)
        #expect(flush(backend) != nil, "a flush cannot succeed while the grown table cannot be written")
        let full = try checkOnDisk(file)
        #expect(full.corruptions == 0, "\(full.messages)")

        // Room again: the next writes and flush finish the move.
        file.writeLimit = nil
        for index in written..<written + 256 {
            #expect(write(backend, Self.pattern(index), at: Int64(index) * 4096) == nil)
        }
        written += 256
        #expect(flush(backend) == nil)
        let header = try QCOW2Header.parse(file.bytes)
        #expect(header.refcountTableOffset != oldTable && header.refcountTableClusters > 1)
        let report = try checkOnDisk(file)
        #expect(report.corruptions == 0, "\(report.messages)")

        try expectReadBack(file, blocks: written)
    }

    /// A new cluster whose data write fails goes back to the allocator, as
    /// in QEMU: once there is room again the check finds no leak, and the
    /// next write takes the same cluster.
    @Test func aNewClusterWhoseDataWriteFailsIsNotLeaked() throws {
        let file = try RecordingFile(image: .init(size: 64 << 20))
        let (driver, _, backend) = try open(file, readOnly: false)
        #expect(write(backend, Self.pattern(0), at: 0) == nil)
        #expect(flush(backend) == nil)
        let end = Int64(file.bytes.count)
        file.writeLimit = end
        let failed = write(backend, Self.pattern(1), at: 2 << 20)
        #expect(failed?.errno == ENOSPC, "\(String(describing: failed))")
        file.writeLimit = nil
        #expect(flush(backend) == nil)
        let report = try checkOnDisk(file)
        #expect(report.corruptions == 0 && report.leaks == 0, "\(report.messages)")
        #expect(write(backend, Self.pattern(1), at: 2 << 20) == nil)
        #expect(flush(backend) == nil)
        #expect(driver.refcounter!.allocationEnd == end + 65536, "the freed cluster is taken again")
        let again = try checkOnDisk(file)
        #expect(again.corruptions == 0 && again.leaks == 0, "\(again.messages)")
    }

    /// The header write that names a grown refcount table fails (the rest
    /// of the move landed): the move stays pending and flushes fail, the
    /// disk keeps naming the old table and checks clean, and once the
    /// header can be written the next flush names the new table.
    @Test func aGrownTableWhoseHeaderWriteFailsIsNamedByALaterFlush() throws {
        var options = QCOW2ImageBuilder.Options(size: 32 << 20)
        options.clusterBits = 9
        let file = try RecordingFile(image: options)
        let (driver, _, backend) = try open(file, readOnly: false)
        let oldTable = driver.header.refcountTableOffset
        file.writeFault = { offset, _ in offset == 0 ? BlockError(errno: EIO, "Input/output error") : nil }
        var written = 0
        var failed: BlockError?
        while failed == nil, driver.tableMove == nil {
            failed = write(backend, Self.pattern(written), at: Int64(written) * 4096)
            if failed == nil { written += 1 }
            try #require(written < 4096, "the table never grew")
        }
        #expect(driver.tableMove != nil, "the move is pending")
        #expect(failed == nil || failed?.errno == EIO, "\(String(describing: failed))")
        #expect(flush(backend)?.errno == EIO, "a flush cannot succeed while the header names the old table")
        #expect(try QCOW2Header.parse(file.bytes).refcountTableOffset == oldTable)
        let stuck = try checkOnDisk(file)
        #expect(stuck.corruptions == 0, "\(stuck.messages)")

        file.writeFault = nil
        #expect(flush(backend) == nil)
        #expect(driver.tableMove == nil)
        #expect(try QCOW2Header.parse(file.bytes).refcountTableOffset == UInt64(driver.refcounter!.tableOffset))
        #expect(driver.header.refcountTableOffset != oldTable)
        let report = try checkOnDisk(file)
        #expect(report.corruptions == 0, "\(report.messages)")
        try expectReadBack(file, blocks: written)
    }

    /// A write into part of an unallocated cluster copies the rest from the
    /// backing file; when that read fails, the write fails and the new
    /// cluster goes back to the allocator, as when its data write fails.
    @Test func aNewClusterWhoseCopyOnWriteReadFailsIsNotLeaked() throws {
        var options = QCOW2ImageBuilder.Options(size: 4 << 20)
        options.backingFile = "base.raw"
        options.backingFormat = "raw"
        let file = try RecordingFile(image: options)
        let base = RecordingFile(bytes: [UInt8](repeating: 0xb5, count: 4 << 20))
        let (driver, _, backend) = try open(file, readOnly: false, backing: base)
        base.readFault = { _, _ in BlockError(errno: EIO, "Input/output error") }
        let failed = write(backend, Self.pattern(1), at: 1 << 20)
        #expect(failed?.errno == EIO, "\(String(describing: failed))")
        let end = driver.refcounter!.allocationEnd  // the L2 table stays
        #expect(flush(backend) == nil)
        let report = try checkOnDisk(file)
        #expect(report.corruptions == 0 && report.leaks == 0, "\(report.messages)")

        base.readFault = nil
        #expect(write(backend, Self.pattern(1), at: 1 << 20) == nil)
        #expect(flush(backend) == nil)
        #expect(driver.refcounter!.allocationEnd == end, "the freed cluster is taken again")
        let (failure, data) = read(backend, count: 65536, at: 1 << 20)
        #expect(failure == nil)
        #expect(Array(data[0..<4096]) == Self.pattern(1))
        #expect(data[4096...].allSatisfy { $0 == 0xb5 }, "the rest of the cluster came from the backing file")
        let again = try checkOnDisk(file)
        #expect(again.corruptions == 0 && again.leaks == 0, "\(again.messages)")
    }
}
