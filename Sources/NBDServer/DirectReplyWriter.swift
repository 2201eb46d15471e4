import Glibc
import NIOCore

/// Sends a connection's replies straight to its socket with gathered
/// `sendmsg` calls (one per flush, at most 64 buffers each), instead of
/// through NIO's outbound pipeline.
///
/// Why: at queue depth 1 a reply's trip through NIO's write path (the
/// type-erased `NIOAny`, the pending-writes bookkeeping, the flush) was
/// ~5 µs of a ~100 µs round trip on the benchmark VM, enough to leave
/// O_DIRECT 4k random reads a few per cent behind qemu-nbd.
///
/// NIO does not tell an accepted channel's descriptor, so `open(for:)` looks
/// for it among the process's descriptors by the socket's cookie and keeps
/// a duplicate of its own: a write can never reach some other file that got
/// NIO's descriptor number after NIO closed it. The owner closes the
/// duplicate when the channel closes, since the socket stays connected
/// while it is open.
///
/// Keeping the byte stream in order is the caller's part
/// (`NBDConnectionHandler.write`): a buffer is batched here only while NIO
/// holds no writes of the connection, and the batch goes out before
/// anything else is handed to NIO. What the socket will not take at once
/// (a client reading slower than the server replies) is handed to NIO, in
/// order, so waiting for the socket stays NIO's job.
final class DirectReplyWriter {
    private var descriptor: CInt
    private var batch: [ByteBuffer] = []
    /// Bytes the batch holds, for the caller's bound on it.
    private(set) var pendingBytes = 0
    /// The most bytes one `send` was given, for tests of that bound.
    private(set) var largestBatch = 0
    /// Reused for every `sendmsg`: no allocation per flush.
    private let vectors: UnsafeMutableBufferPointer<iovec>

    private init(descriptor: CInt) {
        self.descriptor = descriptor
        batch.reserveCapacity(64)
        vectors = .allocate(capacity: 64)
    }

    deinit {
        close()
        vectors.deallocate()
    }

    /// A writer on `channel`'s socket, or nil where its descriptor cannot
    /// be found (not a socket, no `/proc`): the caller then writes through
    /// NIO only. Call on the channel's loop, once it is active; the future
    /// is complete when this returns.
    static func open(for channel: Channel) -> EventLoopFuture<DirectReplyWriter?> {
        guard let provider = channel as? SocketOptionProvider else {
            return channel.eventLoop.makeSucceededFuture(nil)
        }
        let cookie: EventLoopFuture<UInt64> = provider.unsafeGetSocketOption(
            level: .socket, name: NIOBSDSocket.Option(rawValue: socketCookieOption))
        return cookie.map { cookie in
            duplicateDescriptor(withCookie: cookie).map(DirectReplyWriter.init(descriptor:))
        }.recover { _ in nil }
    }

    /// `SO_COOKIE` (Linux 4.12 on): a socket's number, which every
    /// descriptor of it reports. Unique per network namespace (older
    /// kernels) or system-wide; a server's sockets share one namespace.
    static let socketCookieOption: CInt = 57

    /// A duplicate (close-on-exec) of the process's descriptor for the
    /// socket with `cookie`. Each candidate is checked again on its
    /// duplicate, so a descriptor that another thread closes and reuses
    /// meanwhile is never mistaken for it.
    static func duplicateDescriptor(withCookie cookie: UInt64) -> CInt? {
        guard let directory = opendir("/proc/self/fd") else { return nil }
        defer { closedir(directory) }
        let own = dirfd(directory)
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            guard let candidate = CInt(name), candidate != own, Self.cookie(of: candidate) == cookie else { continue }
            let duplicate = fcntl(candidate, F_DUPFD_CLOEXEC, 0)
            guard duplicate >= 0 else { continue }
            if Self.cookie(of: duplicate) == cookie { return duplicate }
            Glibc.close(duplicate)
        }
        return nil
    }

    private static func cookie(of descriptor: CInt) -> UInt64? {
        var value: UInt64 = 0
        var length = socklen_t(MemoryLayout<UInt64>.size)
        guard getsockopt(descriptor, SOL_SOCKET, socketCookieOption, &value, &length) == 0,
              length == MemoryLayout<UInt64>.size else { return nil }
        return value
    }

    /// Whether anything waits for `send`.
    var isEmpty: Bool { batch.isEmpty }

    /// Adds `buffer` to what the next `send` writes.
    func append(_ buffer: ByteBuffer) {
        batch.append(buffer)
        pendingBytes += buffer.readableBytes
    }

    /// Writes the batch, and hands what the socket does not take at once to
    /// `overflow` in order (all of it after an error, which NIO then meets
    /// and reports in its own way).
    func send(overflow: (ByteBuffer) -> Void) {
        largestBatch = max(largestBatch, pendingBytes)
        pendingBytes = 0
        var first = 0
        while first < batch.count {
            let count = min(batch.count - first, vectors.count)
            var total = 0
            for index in 0..<count {
                // The pointer outlives the closure on purpose: the batch
                // holds the storage, unchanged, until the send ends.
                batch[first + index].withUnsafeReadableBytes { bytes in
                    vectors[index] = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress),
                                           iov_len: bytes.count)
                    total += bytes.count
                }
            }
            var message = msghdr()
            message.msg_iov = vectors.baseAddress
            message.msg_iovlen = count
            var sent = -1
            if descriptor >= 0 {
                repeat {
                    sent = sendmsg(descriptor, &message, CInt(MSG_NOSIGNAL) | CInt(MSG_DONTWAIT))
                } while sent < 0 && errno == EINTR
            }
            if sent == total {
                first += count
                continue
            }
            var skip = max(sent, 0)
            for var buffer in batch[first...] {
                if skip >= buffer.readableBytes {
                    skip -= buffer.readableBytes
                    continue
                }
                buffer.moveReaderIndex(forwardBy: skip)
                skip = 0
                overflow(buffer)
            }
            break
        }
        batch.removeAll(keepingCapacity: true)
    }

    /// Drops the batch and closes the duplicate; later sends hand every
    /// buffer to `overflow`.
    func close() {
        batch.removeAll()
        pendingBytes = 0
        guard descriptor >= 0 else { return }
        Glibc.close(descriptor)
        descriptor = -1
    }
}
