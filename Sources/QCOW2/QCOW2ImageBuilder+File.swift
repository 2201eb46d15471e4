import BlockLayer
#if canImport(Glibc)
import Glibc
#endif

extension QCOW2ImageBuilder.Layout {
    /// Writes the layout into the open file `fd` (sized to `fileLength`,
    /// the rest left sparse): what `img create` and `serve -s` do with it.
    public func write(to fd: Int32) throws {
        guard ftruncate(fd, off_t(fileLength)) == 0 else {
            throw BlockError(errno: errno, "Could not resize the image: \(String(cString: strerror(errno)))")
        }
        try forEachPiece { offset, bytes in
            let written = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
            guard written == bytes.count else {
                let error = written < 0 ? errno : EIO
                throw BlockError(errno: error, "Could not write the image: \(String(cString: strerror(error)))")
            }
        }
    }
}
