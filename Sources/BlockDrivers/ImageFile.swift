import BlockLayer
import Glibc

/// Opens the file under an image node without ever blocking.
///
/// Why: `open` of a FIFO blocks until a writer appears. Named as an image,
/// a backing file or a data file, it would hang `strata img`, server start,
/// or (through the control socket) the event loop and every client on it.
/// qemu-img and qemu-nbd block there; Strata opens with `O_NONBLOCK` and
/// refuses anything that is neither a regular file nor a device with the
/// message QEMU's `file` driver gives a directory.
enum ImageFile {
    /// A descriptor for `path` opened with `flags` (`O_NONBLOCK` is only
    /// used for the open itself), or the error to report.
    static func open(_ path: String, flags: Int32) -> Result<Int32, BlockError> {
        let fd = Glibc.open(path, flags | O_NONBLOCK)
        guard fd >= 0 else {
            let error = errno
            return .failure(BlockError(errno: error, "Could not open '\(path)': \(String(cString: strerror(error)))"))
        }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let error = errno
            Glibc.close(fd)
            return .failure(BlockError(errno: error, "Could not stat '\(path)': \(String(cString: strerror(error)))"))
        }
        let type = info.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFBLK || type == S_IFCHR else {
            Glibc.close(fd)
            return .failure(BlockError(errno: EINVAL, "'file' driver requires '\(path)' to be a regular file"))
        }
        // Reads and writes of a device must block as usual (regular files
        // ignore the flag).
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK)
        return .success(fd)
    }
}
