import NIOCore

extension ByteBuffer {
    /// Writes a `size`-byte reply header with `write` into the free bytes
    /// just before the readable ones and makes it readable too, so header
    /// and data go out as one buffer: one write into the channel instead of
    /// two, and no buffer of its own for the header. False, with nothing
    /// changed, when fewer than `size` bytes precede the readable ones.
    ///
    /// The buffer must be the only reference to its storage (a fresh
    /// `transferBuffer`), or the write copies it whole.
    mutating func prependHeader(size: Int, _ write: (inout ByteBuffer) -> Void) -> Bool {
        guard readerIndex >= size else { return false }
        let end = writerIndex
        let start = readerIndex - size
        moveReaderIndex(to: start)
        moveWriterIndex(to: start)
        write(&self)
        precondition(writerIndex == start + size, "reply header of the wrong size")
        moveWriterIndex(to: end)
        return true
    }
}
