import BlockLayer
import Glibc
import NIOCore
import NIOEmbedded
@testable import QCOW2
import Testing

/// A cluster that a discard frees while a read of it is still in flight
/// (at the disk, or lent out for `sendfile`) is not handed to another
/// guest range until the read has ended: the read returns the discarded
/// range's old data, never the new owner's.
@Suite struct QCOW2ClusterUseTests {
    let loop = EmbeddedEventLoop()
    /// Nodes refer to their graph without owning it; the handles lent
    /// files send from are closed with the suite.
    final class Graphs {
        var all: [BlockGraph] = []
        var handles: [NIOFileHandle] = []
        deinit { handles.forEach { try? $0.close() } }
    }
    let graphs = Graphs()
    let clusterSize = 64 << 10

    /// An empty, writable image with 64 KiB clusters. With `sendfile`, its
    /// file lends ranges for sending (of /dev/zero: only the lending counts).
    func open(size: UInt64 = 4 << 20, unmap: Bool = false, sendfile: Bool = false) throws
        -> (QCOW2Driver, RecordingFile, BlockBackend) {
        var options = QCOW2ImageBuilder.Options(size: size)
        options.clusterBits = 16
        let file = try RecordingFile(image: options)
        if sendfile {
            let handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: Glibc.open("/dev/zero", O_RDONLY | O_CLOEXEC))
            graphs.handles.append(handle)
            file.cachedHandle = handle
        }
        return try open(file, unmap: unmap)
    }

    /// The image in `file`, opened writable with empty metadata caches;
    /// the file node punches discarded ranges (discard=unmap) when `unmap`.
    func open(_ file: RecordingFile, unmap: Bool = false) throws -> (QCOW2Driver, RecordingFile, BlockBackend) {
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file,
                                         options: BlockNodeOptions(discard: unmap ? .unmap : .ignore))
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: false))
        loop.run()
        let driver = try future.wait()
        let node = try graph.addNode(name: "image", driver: driver, options: BlockNodeOptions(readOnly: false),
                                     children: [.init(name: "file", role: .image, node: fileNode)])
        let backend = try graph.attachBackend(name: "test", to: node, perm: [.consistentRead, .write], shared: .all)
        return (driver, file, backend)
    }

    /// Runs the completions held in `held` (and any they hold again) until none is left.
    func release(_ held: ReferenceWritableKeyPath<RecordingFile, [() -> Void]?>, of file: RecordingFile) {
        while let waiting = file[keyPath: held], !waiting.isEmpty {
            file[keyPath: held] = []
            waiting.forEach { $0() }
            loop.run()
        }
        file[keyPath: held] = nil
    }

    func run(_ body: (@escaping BlockCompletion) -> Void) {
        var result: BlockError??
        body { result = .some($0) }
        loop.run()
        #expect(result != nil, "the request completed")
        #expect(result ?? nil == nil, "the request succeeded")
    }

    func write(_ driver: QCOW2Driver, cluster: Int, byte: UInt8) {
        let data = [UInt8](repeating: byte, count: clusterSize)
        run { done in data.withUnsafeBytes { driver.write(at: Int64(cluster * clusterSize), from: $0, flags: [], completion: done) } }
    }

    /// Discards guest cluster `cluster` and flushes: its host cluster is free.
    func discard(_ driver: QCOW2Driver, cluster: Int) {
        run { driver.discard(at: Int64(cluster * clusterSize), length: Int64(clusterSize), completion: $0) }
        run { driver.flush(completion: $0) }
    }

    func host(_ driver: QCOW2Driver, cluster: Int) throws -> Int64 {
        var status: BlockStatus?
        driver.blockStatus(at: Int64(cluster * clusterSize), length: Int64(clusterSize)) { status = try? $0.get() }
        loop.run()
        let found = try #require(status)
        #expect(found.flags.contains(.offsetValid))
        return found.offset
    }

    @Test func aReadInFlightKeepsItsClusterFromTheAllocator() throws {
        let (driver, file, _) = try open()
        write(driver, cluster: 0, byte: 0x11)
        run { driver.flush(completion: $0) }
        let old = try host(driver, cluster: 0)

        file.heldReads = []
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: clusterSize, alignment: 4096)
        defer { buffer.deallocate() }
        var readResult: BlockError??
        driver.read(at: 0, into: buffer, flags: []) { readResult = .some($0) }
        loop.run()
        #expect(file.heldReads?.count == 1 && readResult == nil, "the read waits at the disk")

        discard(driver, cluster: 0)
        write(driver, cluster: 1, byte: 0x22)
        #expect(try host(driver, cluster: 1) != old, "the cluster being read is not handed out")

        release(\.heldReads, of: file)
        #expect(readResult.map { $0 == nil } == true)
        #expect(buffer.allSatisfy { $0 == 0x11 }, "the read returns the discarded range's data")

        // Once the read has ended the cluster is free for the next allocation.
        write(driver, cluster: 2, byte: 0x33)
        #expect(try host(driver, cluster: 2) == old)
        #expect(driver.refcounter!.inFlight.isIdle, "no I/O stays counted, no cluster held")
    }

    /// The records that count reads and in-place writes in flight are
    /// reused: as many exist as were ever in flight at once, and one that
    /// completes can start the next request with the same record.
    @Test func dataUsesAreReusedNotAllocatedPerRequest() throws {
        let (driver, file, _) = try open()
        for cluster in 0..<8 { write(driver, cluster: cluster, byte: UInt8(cluster)) }
        run { driver.flush(completion: $0) }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }

        for _ in 0..<2 {
            file.heldReads = []
            var done = 0
            for cluster in 0..<8 {
                driver.read(at: Int64(cluster * clusterSize), into: buffer, flags: []) { error in
                    #expect(error == nil)
                    done += 1
                }
            }
            loop.run()
            #expect(file.heldReads?.count == 8 && driver.idleDataUses.isEmpty, "eight in flight, none idle")
            release(\.heldReads, of: file)
            #expect(done == 8 && driver.idleDataUses.count == 8, "all eight back, none made the second time")
        }

        // Each completion starts the next read and write: one record serves.
        let data = [UInt8](repeating: 0x5a, count: 4096)
        var left = 100
        func next() {
            guard left > 0 else { return }
            left -= 1
            driver.read(at: Int64(left % 8 * clusterSize), into: buffer, flags: []) { error in
                #expect(error == nil)
                data.withUnsafeBytes { bytes in
                    driver.write(at: Int64(left % 8 * clusterSize), from: bytes, flags: []) { error in
                        #expect(error == nil)
                        next()
                    }
                }
            }
        }
        next()
        loop.run()
        #expect(left == 0 && driver.idleDataUses.count == 8, "no record added")
        #expect(driver.refcounter!.inFlight.isIdle, "no I/O stays counted")
    }

    @Test func aReadAcrossTwoL2TablesCountsTheFirstTablesClustersWhileTheSecondLoads() throws {
        let tableSpan = 512 << 20  // one L2 table of 64 KiB clusters
        let (writer, file, _) = try open(size: 1 << 30)
        let last = tableSpan / clusterSize - 1
        write(writer, cluster: last, byte: 0x11)
        write(writer, cluster: last + 1, byte: 0x44)
        run { writer.flush(completion: $0) }
        let old = try host(writer, cluster: last)

        // A second open of the file: its L2 cache holds only the first table.
        let (driver, _, _) = try open(file)
        #expect(try host(driver, cluster: last) == old)
        file.heldReads = []
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 2 * clusterSize, alignment: 4096)
        defer { buffer.deallocate() }
        var readResult: BlockError??
        driver.read(at: Int64(last * clusterSize), into: buffer, flags: []) { readResult = .some($0) }
        loop.run()
        #expect(readResult == nil, "the second table is loading")

        discard(driver, cluster: last)
        write(driver, cluster: 0, byte: 0x22)
        #expect(try host(driver, cluster: 0) != old, "the first table's cluster is counted as being read")

        release(\.heldReads, of: file)
        #expect(readResult.map { $0 == nil } == true)
        #expect(buffer[..<clusterSize].allSatisfy { $0 == 0x11 }, "the discarded cluster's data, not the new write's")
        #expect(buffer[clusterSize...].allSatisfy { $0 == 0x44 })
        #expect(driver.refcounter!.inFlight.isIdle, "no I/O stays counted, no cluster held")
    }

    @Test func anExtentLentForSendfileKeepsItsClusterUntilReleased() throws {
        let (driver, file, backend) = try open(sendfile: true)
        write(driver, cluster: 0, byte: 0x11)
        run { driver.flush(completion: $0) }
        let old = try host(driver, cluster: 0)

        let extent = try #require(backend.beginCachedRead(at: 0, length: clusterSize))
        #expect(extent.offset == old)
        #expect(extent.holder === driver)

        discard(driver, cluster: 0)
        write(driver, cluster: 1, byte: 0x22)
        #expect(try host(driver, cluster: 1) != old, "the lent cluster is not handed out")
        #expect(file.bytes[Int(old)] == 0x11, "and still holds the data being sent")

        backend.endCachedRead(extent)
        // A reply sent may still sit in a socket, referencing the cluster's
        // pages: punched out first, although the node ignores discards.
        #expect(file.discards.count == 1 && file.discards.first?.offset == old)
        write(driver, cluster: 2, byte: 0x33)
        #expect(try host(driver, cluster: 2) == old, "released, it is free again")
        #expect(driver.refcounter!.inFlight.isIdle && driver.refcounter!.lentClusters.isEmpty)
    }

    /// A client may leave a reply unread for as long as it likes: the
    /// extent lent for it holds its own cluster only, not every cluster
    /// freed after it.
    @Test func aLentExtentHoldsBackOnlyItsOwnCluster() throws {
        let (driver, _, backend) = try open(sendfile: true)
        write(driver, cluster: 0, byte: 0x11)
        write(driver, cluster: 1, byte: 0x22)
        run { driver.flush(completion: $0) }
        let lent = try host(driver, cluster: 0)
        let other = try host(driver, cluster: 1)

        let extent = try #require(backend.beginCachedRead(at: 0, length: clusterSize))
        discard(driver, cluster: 1)
        write(driver, cluster: 2, byte: 0x33)
        #expect(try host(driver, cluster: 2) == other, "a cluster freed after the lend is reused at once")

        discard(driver, cluster: 0)
        write(driver, cluster: 3, byte: 0x44)
        #expect(try host(driver, cluster: 3) != lent, "the lent cluster is not")
        backend.endCachedRead(extent)
        write(driver, cluster: 4, byte: 0x55)
        #expect(try host(driver, cluster: 4) == lent)
        #expect(driver.refcounter!.lentClusters.isEmpty && driver.refcounter!.awaitingReturn.isEmpty)
    }

    /// `sendfile` leaves page references, not copies, in the socket: a
    /// freed cluster is punched out of the file (the page cache drops its
    /// pages) only once its last read has been sent, and is handed out
    /// again only once the punch is done.
    @Test func aFreedClusterIsPunchedOutWhenIdleBeforeItIsHandedOutAgain() throws {
        let (driver, file, backend) = try open(unmap: true, sendfile: true)
        write(driver, cluster: 0, byte: 0x11)
        run { driver.flush(completion: $0) }
        let old = try host(driver, cluster: 0)

        let extent = try #require(backend.beginCachedRead(at: 0, length: clusterSize))
        discard(driver, cluster: 0)
        #expect(file.discards.isEmpty, "not punched while the extent is out")

        file.heldDiscards = []
        backend.endCachedRead(extent)
        #expect(file.heldDiscards?.count == 1, "punched once it has been sent")
        write(driver, cluster: 1, byte: 0x22)
        #expect(try host(driver, cluster: 1) != old, "not handed out while the punch runs")

        release(\.heldDiscards, of: file)
        #expect(file.discards.count == 1 && file.discards.first?.offset == old && file.discards.first?.count == Int64(clusterSize))
        write(driver, cluster: 2, byte: 0x33)
        #expect(try host(driver, cluster: 2) == old, "punched, it is free again")
        #expect(driver.refcounter!.awaitingPunch.isEmpty && driver.refcounter!.inFlight.isIdle
                && driver.refcounter!.lentClusters.isEmpty && driver.refcounter!.awaitingReturn.isEmpty)
    }

    /// A flush ends once the clusters its writeback freed are punched and
    /// the allocator's again: a write after it reuses them, as after a
    /// flush in QEMU, instead of growing the file.
    @Test func aFlushEndsOnceTheClustersItFreedArePunched() throws {
        let (driver, file, _) = try open(unmap: true)
        write(driver, cluster: 0, byte: 0x11)
        run { driver.flush(completion: $0) }
        let old = try host(driver, cluster: 0)

        file.heldDiscards = []
        run { driver.discard(at: 0, length: Int64(clusterSize), completion: $0) }
        var flushed: BlockError??
        driver.flush { flushed = .some($0) }
        loop.run()
        #expect(file.heldDiscards?.count == 1 && flushed == nil, "the flush waits for the punch")
        release(\.heldDiscards, of: file)
        #expect(flushed != nil && flushed! == nil, "then ends")
        write(driver, cluster: 1, byte: 0x22)
        #expect(try host(driver, cluster: 1) == old, "the freed cluster is reused")
    }
}
