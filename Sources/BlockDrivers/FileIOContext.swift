import BlockLayer
import NIOCore
import NIOPosix

/// What file nodes of one graph share: the graph's loop, a thread pool for
/// blocking calls, and (once asked for) the loop's Linux AIO engine and
/// io_uring.
public final class FileIOContext {
    public let eventLoop: EventLoop
    public let threadPool: NIOThreadPool
    public private(set) var aio: LinuxAIOEngine?
    public private(set) var uring: IOURingEngine?
    /// Most requests per `io_submit` (or `io_uring_enter`) once an engine starts.
    public var aioMaxBatch = LinuxAIOEngine.defaultMaxBatch
    /// Where the engines reap completions; NBD connections on this loop
    /// flush their replies when a burst ends.
    public let completionBurst = CompletionBurst()
    /// With `aio=threads`, I/O that would wait on a pool thread (small reads
    /// the page cache misses, O_DIRECT reads and writes) goes to the
    /// io_uring instead, when the kernel allows one. Tests turn it off.
    public var threadsModeUsesURing = true
    /// Set once io_uring could not be set up, so `aio=threads` stops asking.
    private var uringUnavailable = false

    public init(eventLoop: EventLoop, threadPool: NIOThreadPool) {
        self.eventLoop = eventLoop
        self.threadPool = threadPool
    }

    /// Sets up Linux AIO if it is not running yet.
    public func startAIO() -> EventLoopFuture<LinuxAIOEngine> {
        start(\.aio) { LinuxAIOEngine.make(on: $0, maxBatch: $1, burst: self.completionBurst) }
    }

    /// Sets up the io_uring if it is not running yet.
    public func startURing() -> EventLoopFuture<IOURingEngine> {
        start(\.uring) { IOURingEngine.make(on: $0, maxBatch: $1, burst: self.completionBurst) }
    }

    /// The engine at `slot`, made once: a second caller that asked while
    /// the first was being made gets the first, and the spare is closed.
    private func start<Engine: FileIOEngine>(_ slot: ReferenceWritableKeyPath<FileIOContext, Engine?>,
                                             _ make: (EventLoop, Int) -> EventLoopFuture<Engine>) -> EventLoopFuture<Engine> {
        if let engine = self[keyPath: slot] { return eventLoop.makeSucceededFuture(engine) }
        return make(eventLoop, aioMaxBatch).map { engine in
            if let existing = self[keyPath: slot] {
                _ = engine.close()
                return existing
            }
            self[keyPath: slot] = engine
            return engine
        }
    }

    /// The io_uring for `aio=threads` (see `threadsModeUsesURing`), or nil
    /// where there is none to be had (turned off, or refused by the kernel
    /// or a seccomp filter): then that I/O goes to the pool.
    func uringForThreadsMode() -> EventLoopFuture<IOURingEngine?> {
        guard threadsModeUsesURing, !uringUnavailable else { return eventLoop.makeSucceededFuture(nil) }
        return startURing().map { Optional($0) }.recover { _ in
            self.uringUnavailable = true
            return nil
        }
    }

    /// Runs a blocking call on the pool; `completion` runs on the loop with
    /// its result (bytes or a negative errno).
    func runBlocking(_ body: @escaping @Sendable () -> Int, completion: @escaping (Int) -> Void) {
        threadPool.runIfActive(eventLoop: eventLoop, body).whenComplete { result in
            switch result {
            case .success(let value): completion(value)
            case .failure: completion(-Int(ESHUTDOWN))
            }
        }
    }

    public func shutdown() -> EventLoopFuture<Void> {
        let engines: [EventLoopFuture<Void>] = [aio?.close(), uring?.close()].compactMap { $0 }
        aio = nil
        uring = nil
        return .andAllComplete(engines, on: eventLoop)
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// Pointers handed to the thread pool. The request path keeps the memory
/// alive until the completion runs, which is what makes this sound.
struct SendablePointer: @unchecked Sendable {
    let raw: UnsafeMutableRawPointer
}
