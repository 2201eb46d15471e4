/// Told when a burst of I/O completions ends (see `CompletionBurst`).
public protocol CompletionBurstListener: AnyObject {
    func completionBurstEnded()
}

/// The I/O completions one event loop handles in one go (all an engine
/// reaps when its eventfd fires), and the listeners to tell once they are
/// done.
///
/// Why: each completion writes an NBD reply, and replies are flushed (one
/// `writev`) per batch, not per reply. Flushing from a task queued on the
/// loop would send the batch a whole loop turn later, after the loop's own
/// bookkeeping; at queue depth 1 that turn is on every request's round
/// trip. A connection that wrote replies during a burst asks to be told
/// when it ends and flushes then, once. Loop-confined, like the engines
/// that run bursts.
public final class CompletionBurst {
    private var depth = 0
    private var telling = false
    private var listeners: [CompletionBurstListener] = []

    public init() {}

    /// Whether completions are being handled now.
    public var isRunning: Bool { depth > 0 }

    /// Runs `completions`, then tells the listeners that asked meanwhile.
    public func run(_ completions: () -> Void) {
        depth += 1
        completions()
        depth -= 1
        guard depth == 0, !telling, !listeners.isEmpty else { return }
        // A listener may cause a burst of its own (a flush that fails a
        // request, say): its listeners join the end of this list.
        telling = true
        var index = 0
        while index < listeners.count {
            let listener = listeners[index]
            index += 1
            listener.completionBurstEnded()
        }
        listeners.removeAll(keepingCapacity: true)
        telling = false
    }

    /// Asks to be told when the running burst ends; false (and nothing
    /// asked) when no burst is running.
    public func notifyWhenEnded(_ listener: CompletionBurstListener) -> Bool {
        guard depth > 0 else { return false }
        listeners.append(listener)
        return true
    }
}
