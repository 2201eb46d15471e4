import BlockLayer
import Glibc

/// Opens the file under an image node without ever blocking on a FIFO.
///
/// Why: `open` of a FIFO blocks until a writer appears. Named as an image,
/// a backing file or a data file, it would hang `strata img`, server start,
/// or (through the control socket) the event loop and every client on it.
/// qemu-img and qemu-nbd block there; Strata refuses anything that is
/// neither a regular file nor a device, with the message QEMU's `file`
/// driver gives a directory. The type is checked before the open (so a
/// FIFO is never opened) and again on the descriptor (the path may have
/// changed in between); the open itself is QEMU's, without `O_NONBLOCK`,
/// which would change how leases and empty drives answer.
enum ImageFile {
    /// A descriptor for `path` opened with `flags`, or the error to report.
    static func open(_ path: String, flags: Int32) -> Result<Int32, BlockError> {
        var info = stat()
        if stat(path, &info) == 0, !isImageFileType(info.st_mode) {
            return .failure(notARegularFile(path))
        }
        let fd = Glibc.open(path, flags)
        guard fd >= 0 else {
            let error = errno
            return .failure(BlockError(errno: error, "Could not open '\(path)': \(String(cString: strerror(error)))"))
        }
        guard fstat(fd, &info) == 0 else {
            let error = errno
            Glibc.close(fd)
            return .failure(BlockError(errno: error, "Could not stat '\(path)': \(String(cString: strerror(error)))"))
        }
        guard isImageFileType(info.st_mode) else {
            Glibc.close(fd)
            return .failure(notARegularFile(path))
        }
        return .success(fd)
    }

    private static func isImageFileType(_ mode: mode_t) -> Bool {
        let type = mode & S_IFMT
        return type == S_IFREG || type == S_IFBLK || type == S_IFCHR
    }

    private static func notARegularFile(_ path: String) -> BlockError {
        BlockError(errno: EINVAL, "'file' driver requires '\(path)' to be a regular file")
    }
}
