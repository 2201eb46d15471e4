#if canImport(Glibc)
import Glibc
#endif

/// An error from the block layer: an errno, with an optional message for
/// the errors a person reads (opening, permissions, locks).
///
/// Request errors keep to the errno so they map onto NBD's error values;
/// they never carry allocations on the hot path (`message` is nil there).
public struct BlockError: Error, Equatable, Sendable, CustomStringConvertible {
    public var errno: Int32
    public var message: String?

    public init(errno: Int32, _ message: String? = nil) {
        self.errno = errno
        self.message = message
    }

    public static let eio = BlockError(errno: EIO)
    public static let einval = BlockError(errno: EINVAL)
    public static let eperm = BlockError(errno: EPERM)
    public static let enospc = BlockError(errno: ENOSPC)
    public static let enotsup = BlockError(errno: ENOTSUP)
    public static let enomem = BlockError(errno: ENOMEM)
    public static let eoverflow = BlockError(errno: EOVERFLOW)
    public static let eshutdown = BlockError(errno: ESHUTDOWN)
    public static let ebusy = BlockError(errno: EBUSY)

    /// True for "the driver cannot do this" (ENOTSUP or EOPNOTSUPP), which
    /// callers answer with a fallback.
    public var isNotSupported: Bool { errno == ENOTSUP || errno == EOPNOTSUPP }

    public var description: String {
        if let message { return message }
        return String(cString: strerror(errno))
    }

    public static func == (lhs: BlockError, rhs: BlockError) -> Bool { lhs.errno == rhs.errno }
}

/// Completion of a request: nil on success.
public typealias BlockCompletion = (BlockError?) -> Void
