import BlockLayer
import NIOCore
import NIOPosix

/// What file nodes of one graph share: the graph's loop, a thread pool for
/// blocking calls, and (once asked for) the loop's Linux AIO engine.
public final class FileIOContext {
    public let eventLoop: EventLoop
    public let threadPool: NIOThreadPool
    public private(set) var aio: LinuxAIOEngine?
    /// Most requests per `io_submit` once Linux AIO starts.
    public var aioMaxBatch = LinuxAIOEngine.defaultMaxBatch

    public init(eventLoop: EventLoop, threadPool: NIOThreadPool) {
        self.eventLoop = eventLoop
        self.threadPool = threadPool
    }

    /// Sets up Linux AIO if it is not running yet.
    public func startAIO() -> EventLoopFuture<LinuxAIOEngine> {
        if let aio { return eventLoop.makeSucceededFuture(aio) }
        return LinuxAIOEngine.make(on: eventLoop, maxBatch: aioMaxBatch).map { engine in
            if let existing = self.aio {
                _ = engine.close()
                return existing
            }
            self.aio = engine
            return engine
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
        guard let aio else { return eventLoop.makeSucceededVoidFuture() }
        self.aio = nil
        return aio.close()
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
