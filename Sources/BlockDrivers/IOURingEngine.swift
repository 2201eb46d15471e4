import BlockLayer
import CLinuxAIO
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// io_uring for one event loop (QEMU's `aio=io_uring`): reads, writes and
/// fdatasync queued during a loop tick are passed to the kernel at its end,
/// at most `maxBatch` per `io_uring_enter`, as `LinuxAIOEngine` does.
///
/// Unlike Linux AIO it needs no O_DIRECT. A read the page cache holds
/// completes inside `io_uring_enter` and is reaped at once; a miss is read
/// by the kernel and completes through task work on this loop's thread,
/// which signals the eventfd the loop watches. So a page-cache miss costs
/// no hop to a thread pool and back, which is what `aio=threads` pays.
public final class IOURingEngine: FileIOEngine {
    /// Result of one I/O: bytes transferred, or a negative errno.
    public typealias Completion = (Int) -> Void

    public let eventLoop: EventLoop
    private let ring: OpaquePointer
    private let eventFD: Int32
    private let capacity: Int
    /// Most entries per `io_uring_enter`.
    public let maxBatch: Int
    private var completions: [Completion?]
    private var freeSlots: [Int]
    private var submitScheduled = false
    /// `io_uring_enter` calls made, for tests of the batching.
    private(set) var submitCalls = 0
    /// Requests waiting for a free slot, oldest first.
    private var overflow: [() -> Void] = []
    private let tags: UnsafeMutablePointer<UInt64>
    private let results: UnsafeMutablePointer<Int32>
    private var channel: Channel?
    private var closed = false

    private init(eventLoop: EventLoop, ring: OpaquePointer, eventFD: Int32, maxBatch: Int) {
        self.eventLoop = eventLoop
        self.ring = ring
        self.eventFD = eventFD
        self.maxBatch = max(1, maxBatch)
        // One slot per submission entry: the ring can never be full.
        capacity = Int(strata_uring_entries(ring))
        completions = Array(repeating: nil, count: capacity)
        freeSlots = Array((0..<capacity).reversed())
        tags = .allocate(capacity: capacity)
        results = .allocate(capacity: capacity)
    }

    /// Sets up a ring of `depth` entries whose completions arrive on `eventLoop`.
    public static func make(on eventLoop: EventLoop, depth: Int = 512,
                            maxBatch: Int = LinuxAIOEngine.defaultMaxBatch) -> EventLoopFuture<IOURingEngine> {
        let fd = strata_eventfd()
        guard fd >= 0 else {
            return eventLoop.makeFailedFuture(BlockError(errno: errno, "eventfd failed"))
        }
        var error: Int32 = 0
        guard let ring = strata_uring_create(UInt32(depth), fd, &error) else {
            Glibc.close(fd)
            // QEMU's words, with the reason.
            return eventLoop.makeFailedFuture(BlockError(errno: error,
                "Unable to use io_uring: failed to init linux io_uring ring: \(String(cString: strerror(error)))"))
        }
        let engine = IOURingEngine(eventLoop: eventLoop, ring: ring, eventFD: fd, maxBatch: maxBatch)
        return NIOPipeBootstrap(group: eventLoop)
            .channelInitializer { channel in
                channel.pipeline.addHandler(CompletionHandler(engine: engine))
            }
            .takingOwnershipOfDescriptor(input: fd)
            .map { channel in
                engine.channel = channel
                return engine
            }
            .flatMapErrorThrowing { error in
                strata_uring_destroy(ring)
                throw error
            }
    }

    /// Queues a read or write of `count` bytes; it is submitted with the
    /// rest of this tick's requests. A result shorter than `count` is the
    /// caller's to continue.
    public func submit(fd: Int32, write: Bool, buffer: UnsafeMutableRawPointer, count: Int, offset: Int64,
                       rwFlags: Int32 = 0, completion: @escaping Completion) {
        guard !closed else { return completion(-Int(ESHUTDOWN)) }
        guard let slot = freeSlots.popLast() else {
            overflow.append { [unowned self] in
                self.submit(fd: fd, write: write, buffer: buffer, count: count, offset: offset,
                            rwFlags: rwFlags, completion: completion)
            }
            return
        }
        // The kernel moves at most ~2 GiB per call anyway; the caller goes on from a short result.
        let length = UInt32(min(count, 1 << 30))
        let prepared = strata_uring_prep_rw(ring, write ? 1 : 0, fd, buffer, length, offset, rwFlags, UInt64(slot))
        queued(slot: slot, prepared: prepared, completion: completion)
    }

    /// Queues an fdatasync of `fd`.
    public func fdatasync(fd: Int32, completion: @escaping Completion) {
        guard !closed else { return completion(-Int(ESHUTDOWN)) }
        guard let slot = freeSlots.popLast() else {
            overflow.append { [unowned self] in self.fdatasync(fd: fd, completion: completion) }
            return
        }
        queued(slot: slot, prepared: strata_uring_prep_fdatasync(ring, fd, UInt64(slot)), completion: completion)
    }

    private func queued(slot: Int, prepared: Int32, completion: @escaping Completion) {
        guard prepared == 0 else {
            // Cannot happen (one slot per entry); fail the request rather than lose it.
            freeSlots.append(slot)
            return completion(Int(prepared))
        }
        completions[slot] = completion
        guard !submitScheduled else { return }
        submitScheduled = true
        eventLoop.execute { [unowned self] in self.submitQueued() }
    }

    private func submitQueued() {
        submitScheduled = false
        guard !closed else { return }
        var failure: Int32 = 0
        while strata_uring_unsubmitted(ring) > 0 {
            let result = strata_uring_submit(ring, UInt32(maxBatch))
            submitCalls += 1
            if result > 0 || result == -EINTR { continue }
            failure = result == 0 ? -EAGAIN : result
            break
        }
        // Page-cache hits completed inside io_uring_enter.
        reap()
        guard !closed, failure != 0, strata_uring_unsubmitted(ring) > 0 else { return }
        if failure == -EAGAIN || failure == -EBUSY {
            // The kernel is short of resources. Our own completions will
            // retry; with none in flight, try again shortly.
            if freeSlots.count + Int(strata_uring_unsubmitted(ring)) == capacity, !submitScheduled {
                submitScheduled = true
                eventLoop.scheduleTask(in: .milliseconds(1)) { [unowned self] in self.submitQueued() }
            }
            return
        }
        // Anything else will not get better: fail what the kernel did not take.
        let count = Int(strata_uring_unqueue(ring, tags, UInt32(capacity)))
        let slots = (0..<count).map { Int(tags[$0]) }
        for slot in slots { complete(slot: slot, result: Int(failure)) }
    }

    private func complete(slot: Int, result: Int) {
        let completion = completions[slot]
        completions[slot] = nil
        freeSlots.append(slot)
        completion?(result)
        if !overflow.isEmpty, !freeSlots.isEmpty {
            overflow.removeFirst()()
        }
    }

    /// Runs every completion the ring holds.
    fileprivate func reap() {
        // The eventfd channel may still deliver a read while it closes.
        guard !closed else { return }
        while true {
            guard !closed else { return }
            let count = Int(strata_uring_reap(ring, tags, results, UInt32(capacity)))
            // Completions that submit more only queue (submission waits for
            // the end of the tick), so `tags` and `results` stay as reaped.
            for index in 0..<count {
                complete(slot: Int(tags[index]), result: Int(results[index]))
            }
            if count < capacity { break }
        }
        // A completion may have closed the engine (the last flush at shutdown).
        guard !closed else { return }
        if strata_uring_unsubmitted(ring) > 0, !submitScheduled {
            submitScheduled = true
            eventLoop.execute { [unowned self] in self.submitQueued() }
        }
    }

    /// Stops the engine; in-flight requests must have completed.
    public func close() -> EventLoopFuture<Void> {
        closed = true
        let future = channel?.close() ?? eventLoop.makeSucceededVoidFuture()
        return future.always { _ in
            strata_uring_destroy(self.ring)
        }
    }

    deinit {
        tags.deallocate()
        results.deallocate()
    }

    /// Drains the eventfd counter and reaps.
    private final class CompletionHandler: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let engine: IOURingEngine
        init(engine: IOURingEngine) { self.engine = engine }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            engine.reap()
        }
    }
}
