@testable import BlockDrivers
import BlockLayer
import CLinuxAIO
import Foundation
import NIOCore
import NIOPosix
import Testing

/// The file driver against real files, in both I/O modes, through a node
/// so the request path's padding is exercised too.
@Suite(.serialized) final class FileDriverTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let pool = NIOThreadPool(numberOfThreads: 2)
    let directory: URL

    init() throws {
        pool.start()
        directory = URL(fileURLWithPath: "/var/tmp").appendingPathComponent("strata-file-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    deinit {
        try? FileManager.default.removeItem(at: directory)
        try? pool.syncShutdownGracefully()
        try? group.syncShutdownGracefully()
    }

    var loop: EventLoop { group.next() }

    func makeFile(size: Int, name: String = "disk.raw") throws -> String {
        let path = directory.appendingPathComponent(name).path
        let bytes = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        return path
    }

    /// Opens `path` as a file node on the loop.
    func open(_ path: String, direct: Bool, aio: FileAIOMode,
              configure: @escaping (FileIOContext) -> Void = { _ in }) throws -> (BlockGraph, BlockNode, FileIOContext) {
        try loop.submit { () -> (BlockGraph, FileIOContext) in
            let io = FileIOContext(eventLoop: self.loop, threadPool: self.pool)
            configure(io)
            return (BlockGraph(eventLoop: self.loop), io)
        }.flatMap { graph, io in
            FileDriver.open(FileDriverOptions(filename: path, direct: direct, aio: aio), io: io).flatMapThrowing {
                (graph, try graph.addNode(name: "file", driver: $0), io)
            }
        }.wait()
    }

    func read(_ node: BlockNode, _ offset: Int64, _ count: Int) throws -> [UInt8] {
        try loop.flatSubmit { () -> EventLoopFuture<[UInt8]> in
            let promise = self.loop.makePromise(of: [UInt8].self)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
            node.read(at: offset, into: buffer) { error in
                defer { buffer.deallocate() }
                if let error { return promise.fail(error) }
                promise.succeed(Array(buffer))
            }
            return promise.futureResult
        }.wait()
    }

    func write(_ node: BlockNode, _ offset: Int64, _ bytes: [UInt8], flags: BlockRequestFlags = []) throws {
        try loop.flatSubmit { () -> EventLoopFuture<Void> in
            let promise = self.loop.makePromise(of: Void.self)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 1)
            buffer.copyBytes(from: bytes)
            node.write(at: offset, from: UnsafeRawBufferPointer(buffer), flags: flags) { error in
                buffer.deallocate()
                if let error { return promise.fail(error) }
                promise.succeed(())
            }
            return promise.futureResult
        }.wait()
    }

    func close(_ graph: BlockGraph, _ io: FileIOContext) throws {
        try loop.flatSubmit { () -> EventLoopFuture<Void> in
            graph.closeAll()
            return io.shutdown()
        }.wait()
    }

    /// Linux AIO or the io_uring, on the test loop.
    func makeEngine(uring: Bool, maxBatch: Int = LinuxAIOEngine.defaultMaxBatch) throws -> FileIOEngine {
        if uring { return try IOURingEngine.make(on: loop, maxBatch: maxBatch).wait() }
        return try LinuxAIOEngine.make(on: loop, maxBatch: maxBatch).wait()
    }

    func submitCalls(_ engine: FileIOEngine) -> Int {
        (engine as? IOURingEngine)?.submitCalls ?? (engine as? LinuxAIOEngine)?.submitCalls ?? 0
    }

    /// The ways a file node can do I/O: `aio` mode, and for `threads`
    /// whether the loop's io_uring takes what would wait on the pool.
    static let ioPaths: [(FileAIOMode, Bool)] = [(.threads, true), (.threads, false), (.native, false), (.ioUring, false)]

    /// Buffered and O_DIRECT for every path but aio=native, which needs O_DIRECT.
    static let roundTripCases = [false, true].flatMap { direct in
        ioPaths.filter { direct || $0.0 != .native }.map { (direct, $0) }
    }

    @Test(arguments: roundTripCases)
    func readsAndWritesRoundTripWithPadding(direct: Bool, path ioPath: (FileAIOMode, Bool)) throws {
        let (aio, ring) = ioPath
        let path = try makeFile(size: 1 << 20, name: "rt-\(direct)-\(aio)-\(ring).raw")
        let (graph, node, io) = try open(path, direct: direct, aio: aio) { $0.threadsModeUsesURing = ring }
        #expect((io.uring != nil) == (aio == .ioUring || ring))
        if direct { #expect(node.limits.requestAlignment >= 512) }
        // Native FUA (RWF_DSYNC) only with O_DIRECT; else write + flush.
        #expect(node.driver.supportedWriteFlags == (direct ? [.fua] : []))
        // O_DIRECT buffers are best page-aligned; cached I/O does not care.
        #expect(node.limits.optimalMemoryAlignment
                    == (direct ? max(CachedFileExtent.pageSize, node.limits.memoryAlignment) : 1))
        let payload = (0..<3000).map { UInt8(truncatingIfNeeded: $0 ^ 0x5a) }
        try write(node, 12345, payload)
        try write(node, 65536, [UInt8](repeating: 7, count: 8192), flags: .fua)
        #expect(try read(node, 12345, 3000) == payload)
        #expect(try read(node, 65536, 8192) == [UInt8](repeating: 7, count: 8192))
        let untouched = try read(node, 0, 100)
        #expect(untouched == (0..<100).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) })
        try close(graph, io)
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: path))
        #expect(Array(onDisk[12345..<15345]) == payload)
    }

    @Test(arguments: ioPaths)
    func readsPastTheLastByteOfAnOddSizedFileAreZeroFilled(path ioPath: (FileAIOMode, Bool)) throws {
        let (aio, ring) = ioPath
        // 1000 bytes: O_DIRECT must read a whole sector and gets a short read.
        let path = try makeFile(size: 1000, name: "odd-\(aio)-\(ring).raw")
        let (graph, node, io) = try open(path, direct: true, aio: aio) { $0.threadsModeUsesURing = ring }
        // The node is whole sectors long, as QEMU sees the file.
        #expect(node.length == 1024)
        let bytes = try read(node, 900, 124)
        #expect(bytes == (900..<1000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) } + [UInt8](repeating: 0, count: 24))
        try close(graph, io)
    }

    /// The records of engine I/O are reused: as many exist as I/Os were
    /// ever in flight at once, and every I/O still lands where it should.
    @Test(arguments: [FileAIOMode.native, .ioUring])
    func engineRequestRecordsAreReused(aio: FileAIOMode) throws {
        let path = try makeFile(size: 1 << 20, name: "records-\(aio).raw")
        let (graph, node, io) = try open(path, direct: true, aio: aio)
        let driver = try #require(node.driver as? FileDriver)
        let buffers = (0..<32).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096) }
        defer { buffers.forEach { $0.deallocate() } }
        for round in 0..<3 {
            // Reads of the even 4 KiB blocks, writes of the odd ones, all at once.
            let idleWhileInFlight = try loop.flatSubmit { () -> EventLoopFuture<Int> in
                var done: [EventLoopFuture<Void>] = []
                for (index, buffer) in buffers.enumerated() {
                    let promise = self.loop.makePromise(of: Void.self)
                    done.append(promise.futureResult)
                    let completion: BlockCompletion = { error in
                        if let error { promise.fail(error) } else { promise.succeed(()) }
                    }
                    if index % 2 == 0 {
                        node.read(at: Int64(index * 4096), into: buffer, completion: completion)
                    } else {
                        buffer.initializeMemory(as: UInt8.self, repeating: UInt8(round * 32 + index))
                        node.write(at: Int64(index * 4096), from: UnsafeRawBufferPointer(buffer), completion: completion)
                    }
                }
                let idle = driver.idleRequests.count
                return EventLoopFuture.andAllSucceed(done, on: self.loop).map { idle }
            }.wait()
            #expect(idleWhileInFlight == 0, "round \(round): all 32 records in use at once")
            #expect(try loop.submit { driver.idleRequests.count }.wait() == 32, "round \(round): none made after the first")
            for index in stride(from: 0, to: 32, by: 2) {
                let expected = (index * 4096..<(index + 1) * 4096).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
                #expect(Array(buffers[index]) == expected, "round \(round): block \(index) read")
            }
        }
        for index in stride(from: 1, to: 32, by: 2) {
            #expect(try read(node, Int64(index * 4096), 4096) == [UInt8](repeating: UInt8(64 + index), count: 4096))
        }
        try close(graph, io)
    }

    @Test(arguments: [false, true])
    func failedIOSurfacesAsAnErrorAndTheEngineGoesOn(uring: Bool) throws {
        let path = try makeFile(size: 1 << 16, name: "fail-\(uring).raw")
        let engine = try makeEngine(uring: uring)
        let fd = Glibc.open(path, O_RDWR | strata_O_DIRECT)
        #expect(fd >= 0)
        defer { Glibc.close(fd) }
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { memory.deallocate() }
        // An O_DIRECT read at a misaligned offset fails with EINVAL.
        let failed = try loop.flatSubmit { () -> EventLoopFuture<Int> in
            let promise = self.loop.makePromise(of: Int.self)
            engine.submit(fd: fd, write: false, buffer: memory, count: 512, offset: 1, rwFlags: 0) { promise.succeed($0) }
            return promise.futureResult
        }.wait()
        #expect(failed == -Int(EINVAL))
        // A short read at the end of the file.
        let short = try loop.flatSubmit { () -> EventLoopFuture<Int> in
            let promise = self.loop.makePromise(of: Int.self)
            engine.submit(fd: fd, write: false, buffer: memory, count: 8192, offset: (1 << 16) - 4096,
                              rwFlags: 0) { promise.succeed($0) }
            return promise.futureResult
        }.wait()
        #expect(short == 4096)
        // Many at once, more than one batch.
        let many = try loop.flatSubmit { () -> EventLoopFuture<[Int]> in
            let futures = (0..<64).map { index -> EventLoopFuture<Int> in
                let promise = self.loop.makePromise(of: Int.self)
                engine.submit(fd: fd, write: false, buffer: memory, count: 512, offset: Int64(index * 512),
                              rwFlags: 0) { promise.succeed($0) }
                return promise.futureResult
            }
            return EventLoopFuture.whenAllSucceed(futures, on: self.loop)
        }.wait()
        #expect(many.allSatisfy { $0 == 512 })
        try loop.flatSubmit { engine.close() }.wait()
    }

    /// With one request per `io_submit` there is nothing to batch: the disk
    /// starts on a request at once, not after the rest of the loop's tick.
    @Test func linuxAIOSubmitsAtOnceWithoutBatching() throws {
        let path = try makeFile(size: 1 << 16, name: "at-once.raw")
        let engine = try LinuxAIOEngine.make(on: loop, maxBatch: 1).wait()
        let fd = Glibc.open(path, O_RDONLY | strata_O_DIRECT)
        #expect(fd >= 0)
        defer { Glibc.close(fd) }
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { memory.deallocate() }
        let (submittedAtOnce, result) = try loop.flatSubmit { () -> EventLoopFuture<(Bool, Int)> in
            let before = engine.submitCalls
            let promise = self.loop.makePromise(of: Int.self)
            engine.submit(fd: fd, write: false, buffer: memory, count: 4096, offset: 4096, rwFlags: 0) {
                promise.succeed($0)
            }
            let atOnce = engine.submitCalls == before + 1
            return promise.futureResult.map { (atOnce, $0) }
        }.wait()
        #expect(submittedAtOnce)
        #expect(result == 4096)
        #expect(Array(UnsafeRawBufferPointer(start: memory, count: 4096))
                == (4096..<8192).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) })
        try loop.flatSubmit { engine.close() }.wait()
    }

    /// A batch bigger than the queue (even past UInt32, as
    /// `--aio-max-batch` may ask) is the queue's size.
    @Test(arguments: [false, true], [1, 3, 512, 1 << 32])
    func enginePassesAtMostMaxBatchRequestsPerSubmit(uring: Bool, maxBatch: Int) throws {
        let path = try makeFile(size: 1 << 16, name: "batch-\(uring)-\(maxBatch).raw")
        let engine = try makeEngine(uring: uring, maxBatch: maxBatch)
        let fd = Glibc.open(path, O_RDONLY | strata_O_DIRECT)
        #expect(fd >= 0)
        defer { Glibc.close(fd) }
        let count = 64
        let memory = UnsafeMutableRawPointer.allocate(byteCount: count * 512, alignment: 4096)
        defer { memory.deallocate() }
        // All submitted in one loop tick, reading the file backwards.
        let (results, calls) = try loop.flatSubmit { () -> EventLoopFuture<([Int], Int)> in
            let before = self.submitCalls(engine)
            let futures = (0..<count).map { index -> EventLoopFuture<Int> in
                let promise = self.loop.makePromise(of: Int.self)
                engine.submit(fd: fd, write: false, buffer: memory + index * 512, count: 512,
                              offset: Int64((count - 1 - index) * 512), rwFlags: 0) { promise.succeed($0) }
                return promise.futureResult
            }
            return EventLoopFuture.whenAllSucceed(futures, on: self.loop).map { ($0, self.submitCalls(engine) - before) }
        }.wait()
        #expect(results.allSatisfy { $0 == 512 })
        #expect(calls >= (count + maxBatch - 1) / maxBatch)
        if maxBatch >= count { #expect(calls < count) }
        for index in 0..<count {
            let fileOffset = (count - 1 - index) * 512
            let got = UnsafeRawBufferPointer(start: memory + index * 512, count: 512)
            #expect(Array(got) == (fileOffset..<fileOffset + 512).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) })
        }
        try loop.flatSubmit { engine.close() }.wait()
    }

    /// Whether the page at `offset` of `fd` is in the page cache (mincore
    /// on a mapping, which does not fault the page in).
    func isResident(_ fd: Int32, at offset: Int, fileSize: Int) throws -> Bool {
        let map = try #require(mmap(nil, fileSize, PROT_READ, MAP_SHARED, fd, 0))
        defer { munmap(map, fileSize) }
        var vector = [UInt8](repeating: 0, count: (fileSize + 4095) / 4096)
        #expect(mincore(map, fileSize, &vector) == 0)
        return vector[offset / 4096] & 1 != 0
    }

    /// A test file whose pages are written out and dropped from the page
    /// cache, and a descriptor to check them with (the caller closes it).
    func evictedFile(size: Int, name: String) throws -> (path: String, fd: Int32) {
        let path = try makeFile(size: size, name: name)
        let fd = Glibc.open(path, O_RDONLY)
        #expect(fd >= 0)
        #expect(fdatasync(fd) == 0)
        #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        return (path, fd)
    }

    @Test func pageCacheMissesAreReadThroughTheRingAndHitsAreNot() throws {
        let size = 4 << 20
        let (path, fd) = try evictedFile(size: size, name: "miss.raw")
        defer { Glibc.close(fd) }
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        let ring = try #require(io.uring, "aio=threads has no io_uring for page-cache misses")
        func expected(_ offset: Int) -> [UInt8] { (offset..<offset + 4096).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) } }
        // A miss starts readahead, which on a fast disk can land before the
        // RWF_NOWAIT read gives up, and then the read ends on the loop. So
        // misses are tried a number of times, each on a page of its own: a
        // driver that never takes the ring for a miss fails every time.
        var missOffset: Int?
        for attempt in 0..<24 where missOffset == nil {
            let offset = 64 * 1024 + attempt * 160 * 1024
            #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
            try #require(!(try isResident(fd, at: offset, fileSize: size)), "the kernel kept the page cached")
            let before = ring.submitCalls
            #expect(try read(node, Int64(offset), 4096) == expected(offset))
            if ring.submitCalls > before { missOffset = offset }
        }
        guard let offset = missOffset else {
            try close(graph, io)  // so the suite's temporary directory goes too
            Issue.record("no page-cache miss went through the ring")
            return
        }
        // Now cached: read at once on the loop, not through the ring.
        #expect(try isResident(fd, at: offset, fileSize: size))
        let after = ring.submitCalls
        #expect(try read(node, Int64(offset), 4096) == expected(offset))
        #expect(ring.submitCalls == after)
        try close(graph, io)
    }

    @Test func withoutTheRingPageCacheMissesGoToThePool() throws {
        let size = 1 << 20, offset = 256 << 10
        let (path, fd) = try evictedFile(size: size, name: "pool.raw")
        defer { Glibc.close(fd) }
        let (graph, node, io) = try open(path, direct: false, aio: .threads) { $0.threadsModeUsesURing = false }
        #expect(io.uring == nil)
        #expect(try read(node, Int64(offset), 8192) == (offset..<offset + 8192).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) })
        try close(graph, io)
    }

    @Test func theRingFlushesAndReportsAFailedFlush() throws {
        let path = try makeFile(size: 4096, name: "sync.raw")
        let engine = try IOURingEngine.make(on: loop).wait()
        let fd = Glibc.open(path, O_RDWR)
        #expect(fd >= 0)
        defer { Glibc.close(fd) }
        let results = try loop.flatSubmit { () -> EventLoopFuture<[Int]> in
            let futures = [fd, -1].map { target -> EventLoopFuture<Int> in
                let promise = self.loop.makePromise(of: Int.self)
                engine.fdatasync(fd: target) { promise.succeed($0) }
                return promise.futureResult
            }
            return EventLoopFuture.whenAllSucceed(futures, on: self.loop)
        }.wait()
        #expect(results == [0, -Int(EBADF)])
        try loop.flatSubmit { engine.close() }.wait()
    }

    @Test func blockStatusFollowsHolesAndData() throws {
        let path = directory.appendingPathComponent("sparse.raw").path
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.truncate(atOffset: 4 << 20)
        try handle.seek(toOffset: 1 << 20)
        handle.write(Data(repeating: 1, count: 65536))
        try handle.close()
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        let statuses = try loop.flatSubmit { () -> EventLoopFuture<[BlockStatus]> in
            let promise = self.loop.makePromise(of: [BlockStatus].self)
            var results: [BlockStatus] = []
            func next(_ offset: Int64) {
                guard offset < node.length else { return promise.succeed(results) }
                node.blockStatus(at: offset, length: node.length - offset) { result in
                    guard case .success(let status) = result else { return promise.fail(BlockError.eio) }
                    results.append(status)
                    next(offset + status.length)
                }
            }
            next(0)
            return promise.futureResult
        }.wait()
        #expect(statuses.count == 3)
        #expect(statuses[0].flags.contains(.zero) && !statuses[0].flags.contains(.data))
        #expect(statuses[1].flags.contains(.data) && statuses[1].length == 65536)
        #expect(statuses[2].flags.contains(.zero))
        try close(graph, io)
    }

    @Test func imageLocksConflictLikeQemus() throws {
        let path = try makeFile(size: 4096, name: "locks.raw")
        let first = Glibc.open(path, O_RDWR)
        let second = Glibc.open(path, O_RDWR)
        defer { Glibc.close(first); Glibc.close(second) }
        var holder = ImageLocks(fd: first, filename: path)
        try holder.apply(perm: [.consistentRead, .write], shared: [.consistentRead, .writeUnchanged])
        var other = ImageLocks(fd: second, filename: path)
        #expect {
            try other.apply(perm: [.consistentRead, .write], shared: .all)
        } throws: { error in
            "\(error)".contains("Failed to get \"write\" lock") && "\(error)".contains("Is another process using the image")
        }
        #expect(throws: BlockError.self) {
            try other.apply(perm: .consistentRead, shared: [.consistentRead])
        }
        // Reading while sharing writes is fine.
        try other.apply(perm: .consistentRead, shared: .all)
        try holder.apply(perm: [], shared: .all)
        try other.apply(perm: [.consistentRead, .write], shared: [.consistentRead])
    }

    @Test func probeRecognisesFormatsByMagic() {
        #expect(FormatProbe.detect(Array("QFI".utf8) + [0xfb, 0, 0, 0, 3]) == "qcow2")
        #expect(FormatProbe.detect(Array("QFI".utf8) + [0xfb, 0, 0, 0, 1]) == "qcow")
        // Version 0 is neither, as in QEMU: raw, unless another magic matches.
        var versionZero = Array("QFI".utf8) + [0xfb] + [UInt8](repeating: 0, count: 508)
        #expect(FormatProbe.detect(versionZero) == "raw")
        versionZero.replaceSubrange(0x40..<0x44, with: [0x7f, 0x10, 0xda, 0xbe])
        #expect(FormatProbe.detect(versionZero) == "vdi")
        #expect(FormatProbe.detect([UInt8](repeating: 0, count: 512)) == "raw")
        #expect(FormatProbe.detect(Array("conectix".utf8)) == "vpc")
        #expect(FormatProbe.detect([]) == "raw")
    }
}
