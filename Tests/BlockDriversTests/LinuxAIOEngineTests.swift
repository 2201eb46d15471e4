@testable import BlockDrivers
import CLinuxAIO
import Foundation
import NIOCore
import NIOPosix
import Testing

/// How Linux AIO completions come back: off the kernel's ring, and in the
/// loop turn that submitted them when the kernel finished them at once.
@Suite(.serialized) final class LinuxAIOEngineTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var loop: EventLoop { group.next() }
    var files: [String] = []

    deinit {
        for path in files { unlink(path) }
        try? group.syncShutdownGracefully()
    }

    /// A file of `size` patterned bytes under `directory`, opened O_DIRECT;
    /// nil when the file system refuses O_DIRECT.
    func makeDirectFile(in directory: String, size: Int) throws -> Int32? {
        let path = "\(directory)/strata-aio-\(UUID().uuidString.prefix(8)).raw"
        files.append(path)
        try Data(Self.pattern(0..<size)).write(to: URL(fileURLWithPath: path))
        let fd = open(path, O_RDONLY | strata_O_DIRECT)
        return fd >= 0 ? fd : nil
    }

    static func pattern(_ range: Range<Int>) -> [UInt8] {
        range.map { UInt8(truncatingIfNeeded: $0 &* 29 &+ 7) }
    }

    /// Whether tmpfs takes O_DIRECT here (Linux 6.6 and later).
    static let tmpfsTakesDirectIO: Bool = {
        let path = "/dev/shm/strata-aio-probe-\(getpid())"
        let fd = open(path, O_RDWR | O_CREAT | strata_O_DIRECT, 0o600)
        unlink(path)
        if fd >= 0 { close(fd) }
        return fd >= 0
    }()

    @Test func completionsComeOffTheRingWithoutASystemCall() throws {
        let engine = try LinuxAIOEngine.make(on: loop).wait()
        #expect(engine.readsRingDirectly)
        try loop.flatSubmit { engine.close() }.wait()
    }

    /// tmpfs copies an O_DIRECT read inside `io_submit`. Its completion
    /// must run in that loop turn, before a task queued just after the
    /// submission, not after the loop's next `epoll_wait`.
    @Test(.enabled(if: tmpfsTakesDirectIO, "tmpfs refuses O_DIRECT on this kernel"))
    func aRequestTheKernelFinishedAtOnceCompletesInTheSameTurn() throws {
        let fd = try #require(try makeDirectFile(in: "/dev/shm", size: 1 << 16))
        defer { close(fd) }
        let engine = try LinuxAIOEngine.make(on: loop).wait()
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { memory.deallocate() }
        let (completedFirst, result) = try loop.flatSubmit { () -> EventLoopFuture<(Bool, Int)> in
            var result: Int?
            engine.submit(fd: fd, write: false, buffer: memory, count: 4096, offset: 8192) { result = $0 }
            let promise = self.loop.makePromise(of: (Bool, Int).self)
            self.loop.execute { promise.succeed((result != nil, result ?? 0)) }
            return promise.futureResult
        }.wait()
        #expect(completedFirst)
        #expect(result == 4096)
        #expect(Array(UnsafeRawBufferPointer(start: memory, count: 4096)) == Self.pattern(8192..<12288))
        try loop.flatSubmit { engine.close() }.wait()
    }

    /// Whether the ring holds finished events is read without a system
    /// call: none on a new context, the read tmpfs finished inside
    /// `io_submit`, none once it is taken. The engine queues its look at
    /// the ring after a submission only on this answer.
    @Test(.enabled(if: tmpfsTakesDirectIO, "tmpfs refuses O_DIRECT on this kernel"))
    func theRingSaysWhetherItHoldsEvents() throws {
        let fd = try #require(try makeDirectFile(in: "/dev/shm", size: 1 << 16))
        defer { close(fd) }
        // Freed after io_destroy, which waits for a read still in flight.
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { memory.deallocate() }
        var context: io_context_t?
        try #require(io_setup(8, &context) == 0)
        let ring = try #require(context)
        defer { io_destroy(ring) }
        try #require(strata_aio_ring_known(ring) == 1)
        #expect(strata_aio_ring_may_have_events(ring) == 0)

        let signal = strata_eventfd()
        try #require(signal >= 0)
        defer { close(signal) }
        var request = iocb()
        strata_iocb_prep(&request, fd, 0, memory, 4096, 4096, signal, 0, 7)
        try withUnsafeMutablePointer(to: &request) { pointer in
            var list: UnsafeMutablePointer<iocb>? = pointer
            try #require(io_submit(ring, 1, &list) == 1)
        }
        #expect(strata_aio_ring_may_have_events(ring) == 1)
        var event = io_event()
        #expect(strata_aio_reap(ring, 1, &event) == 1)
        #expect(strata_io_event_tag(&event) == 7)
        #expect(strata_io_event_result(&event) == 4096)
        #expect(strata_aio_ring_may_have_events(ring) == 0)
    }

    /// A small context whose ring the reads go round many times, a few at
    /// a time: every read gets its own result and bytes.
    @Test func readsGoRoundTheRingManyTimes() throws {
        let blocks = 64
        let fd = try #require(try makeDirectFile(in: "/var/tmp", size: blocks * 4096))
        defer { close(fd) }
        let engine = try LinuxAIOEngine.make(on: loop, depth: 4).wait()
        let memory = UnsafeMutableRawPointer.allocate(byteCount: 4 * 4096, alignment: 4096)
        defer { memory.deallocate() }
        let rounds = 300   // 1,200 reads; the kernel's ring for depth 4 holds about 127
        for round in 0..<rounds {
            let results = try loop.flatSubmit { () -> EventLoopFuture<[Int]> in
                let futures = (0..<4).map { slot -> EventLoopFuture<Int> in
                    let promise = self.loop.makePromise(of: Int.self)
                    let block = (round * 4 + slot) % blocks
                    engine.submit(fd: fd, write: false, buffer: memory + slot * 4096, count: 4096,
                                  offset: Int64(block * 4096)) { promise.succeed($0) }
                    return promise.futureResult
                }
                return EventLoopFuture.whenAllSucceed(futures, on: self.loop)
            }.wait()
            #expect(results == [4096, 4096, 4096, 4096])
            for slot in 0..<4 {
                let block = (round * 4 + slot) % blocks
                let bytes = Array(UnsafeRawBufferPointer(start: memory + slot * 4096, count: 4096))
                #expect(bytes == Self.pattern(block * 4096..<(block + 1) * 4096), "round \(round) slot \(slot)")
            }
        }
        try loop.flatSubmit { engine.close() }.wait()
    }
}
