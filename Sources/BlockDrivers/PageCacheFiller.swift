import CLinuxAIO
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Reads file ranges into the page cache without copying them out, so that
/// a large READ the cache missed can still go out with `sendfile` (see
/// `CachedFileExtent`) once its pages are in.
///
/// Read into a buffer instead, such a READ costs the server two copies of
/// every byte: out of the page cache, and into the socket. Splicing the
/// range into a pipe and out of it into /dev/null waits for the disk as
/// `pread` does, with the same readahead, but moves page references only:
/// a cold 2 GiB nbdcopy pass took 0.55-0.6 s of server CPU this way
/// against 1.0-1.1 s read into buffers.
///
/// The pipes are shared by every file, one per fill running at once, and
/// kept for the next fill; they hold nothing between fills.
final class PageCacheFiller: Sendable {
    /// Nil where /dev/null cannot be opened: then nothing is filled.
    static let shared = PageCacheFiller()

    /// Bytes a pipe takes per splice: a 1 MiB READ in one turn, and the
    /// most an unprivileged process may ask for by default.
    static let pipeSize: Int32 = 1 << 20

    private struct Pipe {
        var read: Int32
        var write: Int32
    }

    private let devNull: Int32
    private let idlePipes = Mutex<[Pipe]>([])

    private init?() {
        devNull = open("/dev/null", O_WRONLY | O_CLOEXEC)
        guard devNull >= 0 else { return nil }
    }

    /// Blocks until `[offset, offset + length)` of `fd` is in the page
    /// cache (run it on a pool thread). The bytes filled, short at the end
    /// of the file, or -errno (-EINVAL: the file cannot be spliced).
    func fill(fd: Int32, offset: Int64, length: Int) -> Int {
        let pipe: Pipe
        if let idle = idlePipes.withLock({ $0.popLast() }) {
            pipe = idle
        } else {
            var fds: (Int32, Int32) = (-1, -1)
            let result = withUnsafeMutableBytes(of: &fds) {
                strata_fill_pipe($0.baseAddress!.assumingMemoryBound(to: Int32.self), Self.pipeSize)
            }
            if result < 0 { return Int(result) }
            pipe = Pipe(read: fds.0, write: fds.1)
        }
        let result = strata_fill_page_cache(fd, offset, Int64(length), pipe.read, pipe.write, devNull)
        var held: Int32 = 0
        if result >= 0 || (ioctl(pipe.read, UInt(FIONREAD), &held) == 0 && held == 0) {
            idlePipes.withLock { $0.append(pipe) }
        } else {
            // Pages of this range are still in it.
            close(pipe.read)
            close(pipe.write)
        }
        return Int(result)
    }
}
