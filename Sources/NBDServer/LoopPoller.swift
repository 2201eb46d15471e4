import NIOCore

/// Keeps an event loop polling, instead of sleeping, for a short window
/// after it sends replies: QEMU's iothread `poll-max-ns`.
///
/// Why: a loop that sleeps in `epoll_wait` between a reply and the client's
/// next request lets its CPU go idle, and waking an idle CPU (in a VM, a
/// halted vCPU) can cost more than the request itself. Measured on the
/// 2-vCPU benchmark VM, 4 KiB QD1 reads from the page cache: 15–16K IOPS
/// sleeping, 19–22K polling 32 µs, for twice the CPU per request. While
/// clients are busy the loop polls all the time (a whole core), which a
/// 2-core machine feels, so it is off unless asked for.
///
/// Polling is a task that re-queues itself, which makes the loop call
/// `epoll_wait` with a zero timeout (NIO does that while tasks are pending)
/// until the window has passed without activity; an idle server sleeps.
public final class LoopPoller {
    public let eventLoop: EventLoop
    /// How long to keep polling after the last replies, in nanoseconds.
    /// Fixed, not adaptive: the gap a sleeping loop measures between a
    /// reply and the next request includes its own wake-up, so an adaptive
    /// window shrinks to nothing exactly where polling helps (measured).
    public let window: UInt64
    private var deadline = NIODeadline.uptimeNanoseconds(0)
    /// Whether a poll task is queued: the loop is not sleeping.
    private(set) var isPolling = false
    /// Poll passes so far, for tests.
    private(set) var polls = 0
    private var pollTask: (() -> Void)!

    /// `window` 0 turns polling off.
    public init(eventLoop: EventLoop, windowNanoseconds window: UInt64) {
        self.eventLoop = eventLoop
        self.window = window
        pollTask = { [weak self] in self?.poll() }
    }

    /// Replies went out, so the next request is likely close: keep the loop
    /// awake for another window. Call on the loop.
    public func noteActivity() {
        guard window > 0 else { return }
        // Saturates: a huge window polls until the end of time, no overflow.
        deadline = .now() + .nanoseconds(Int64(clamping: window))
        if !isPolling {
            isPolling = true
            eventLoop.execute(pollTask)
        }
    }

    private func poll() {
        polls += 1
        if NIODeadline.now() < deadline {
            eventLoop.execute(pollTask)
        } else {
            isPolling = false
        }
    }
}
