import NIOCore

/// What the `file` driver needs of an asynchronous I/O engine on the
/// graph's loop: Linux AIO (`aio=native`) or io_uring (`aio=io_uring`).
/// Completions run on that loop with bytes transferred or a negative errno.
public protocol FileIOEngine: AnyObject {
    func submit(fd: Int32, write: Bool, buffer: UnsafeMutableRawPointer, count: Int, offset: Int64,
                rwFlags: Int32, completion: @escaping (Int) -> Void)
    /// Stops the engine; in-flight requests must have completed.
    func close() -> EventLoopFuture<Void>
}
