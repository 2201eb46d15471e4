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
    private let slots: CompletionSlots
    private let burst: CompletionBurst
    private var submitScheduled = false
    /// `io_uring_enter` calls made, for tests of the batching.
    private(set) var submitCalls = 0
    private let tags: UnsafeMutablePointer<UInt64>
    private let results: UnsafeMutablePointer<Int32>
    private var channel: Channel?
    private var closed = false

    private init(eventLoop: EventLoop, ring: OpaquePointer, eventFD: Int32, maxBatch: Int, burst: CompletionBurst) {
        self.eventLoop = eventLoop
        self.burst = burst
        self.ring = ring
        self.eventFD = eventFD
        // One slot per submission entry: the ring can never be full.
        capacity = Int(strata_uring_entries(ring))
        // No batch is bigger than the ring (and a caller's value past
        // UInt32 must not reach the C call).
        self.maxBatch = min(max(1, maxBatch), capacity)
        slots = CompletionSlots(capacity: capacity)
        tags = .allocate(capacity: capacity)
        results = .allocate(capacity: capacity)
    }

    /// Sets up a ring of `depth` entries whose completions arrive on `eventLoop`.
    public static func make(on eventLoop: EventLoop, depth: Int = 512,
                            maxBatch: Int = LinuxAIOEngine.defaultMaxBatch,
                            burst: CompletionBurst = CompletionBurst()) -> EventLoopFuture<IOURingEngine> {
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
        let engine = IOURingEngine(eventLoop: eventLoop, ring: ring, eventFD: fd, maxBatch: maxBatch, burst: burst)
        return EventFDChannel.watch(fd, on: eventLoop) { engine.reap() }
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
        guard let slot = slots.take(completion) else {
            return slots.wait { [unowned self] in
                self.submit(fd: fd, write: write, buffer: buffer, count: count, offset: offset,
                            rwFlags: rwFlags, completion: completion)
            }
        }
        // The kernel moves at most ~2 GiB per call anyway; the caller goes on from a short result.
        let length = UInt32(min(count, 1 << 30))
        let prepared = strata_uring_prep_rw(ring, write ? 1 : 0, fd, buffer, length, offset, rwFlags, UInt64(slot))
        queued(slot: slot, prepared: prepared)
    }

    /// Queues an fdatasync of `fd`.
    public func fdatasync(fd: Int32, completion: @escaping Completion) {
        guard !closed else { return completion(-Int(ESHUTDOWN)) }
        guard let slot = slots.take(completion) else {
            return slots.wait { [unowned self] in self.fdatasync(fd: fd, completion: completion) }
        }
        queued(slot: slot, prepared: strata_uring_prep_fdatasync(ring, fd, UInt64(slot)))
    }

    private func queued(slot: Int, prepared: Int32) {
        guard prepared == 0 else {
            // Cannot happen (one slot per entry); fail the request rather than lose it.
            return slots.complete(slot, result: Int(prepared))
        }
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
        guard failure != 0, strata_uring_unsubmitted(ring) > 0 else { return }
        if failure == -EAGAIN || failure == -EBUSY {
            // The kernel is short of resources. Our own completions will
            // retry; with none in flight, try again shortly.
            if slots.freeCount + Int(strata_uring_unsubmitted(ring)) == capacity, !submitScheduled {
                submitScheduled = true
                eventLoop.scheduleTask(in: .milliseconds(1)) { [unowned self] in self.submitQueued() }
            }
            return
        }
        // Anything else will not get better: fail what the kernel did not take.
        let count = Int(strata_uring_unqueue(ring, tags, UInt32(capacity)))
        let failed = (0..<count).map { Int(tags[$0]) }
        for slot in failed { slots.complete(slot, result: Int(failure)) }
    }

    /// Runs every completion the ring holds.
    private func reap() {
        // The eventfd channel may still deliver a read while it closes.
        guard !closed else { return }
        burst.run {
            while true {
                let count = Int(strata_uring_reap(ring, tags, results, UInt32(capacity)))
                // Completions that submit more only queue (submission waits for
                // the end of the tick), so `tags` and `results` stay as reaped.
                for index in 0..<count {
                    slots.complete(Int(tags[index]), result: Int(results[index]))
                }
                if count < capacity { break }
            }
        }
        if strata_uring_unsubmitted(ring) > 0, !submitScheduled {
            submitScheduled = true
            eventLoop.execute { [unowned self] in self.submitQueued() }
        }
    }

    /// Stops the engine; in-flight requests must have completed.
    public func close() -> EventLoopFuture<Void> {
        closed = true
        let channelClosed = channel?.close() ?? eventLoop.makeSucceededVoidFuture()
        // Destroyed from a task of its own: `close` may be called by a
        // completion, inside `reap`, which then goes on using the ring.
        return channelClosed.recover { _ in }.flatMap {
            self.eventLoop.submit { strata_uring_destroy(self.ring) }
        }
    }

    deinit {
        tags.deallocate()
        results.deallocate()
    }
}
