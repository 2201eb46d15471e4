import FoundationEssentials
import Glibc

/// systemd socket activation: listening sockets passed as fds 3… with
/// LISTEN_PID naming this process and LISTEN_FDS their count.
///
/// As qemu-nbd: one socket only, and the variables are checked before the
/// image is opened, so a bad setup fails at once instead of after a slow
/// open, and fds 3… are never the server's own files by then.
enum SocketActivation {
    static let firstDescriptor: CInt = 3

    /// How many sockets the environment passes to this process: nil where
    /// LISTEN_PID names another process, or the variables are unset,
    /// malformed or zero (qemu-nbd ignores those too).
    private static var passedCount: Int? {
        let environment = ProcessInfo.processInfo.environment
        guard let pid = environment["LISTEN_PID"].flatMap(Int32.init), pid == getpid(),
              let count = environment["LISTEN_FDS"].flatMap(Int.init), count > 0 else { return nil }
        return count
    }

    /// Whether the environment passes sockets to this process.
    static var isActive: Bool { passedCount != nil }

    /// The listening socket passed to this process, or nil where none is.
    /// Clears the variables.
    static func takeListeningDescriptor() throws -> CInt? {
        guard let count = passedCount else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        guard count == 1 else {
            throw SocketActivationError("socket activation with LISTEN_FDS > 1 is not supported (one listening socket only)")
        }
        var info = stat()
        guard fstat(firstDescriptor, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else {
            throw SocketActivationError("socket activation: file descriptor \(firstDescriptor) is not a socket")
        }
        _ = fcntl(firstDescriptor, F_SETFD, FD_CLOEXEC)
        return firstDescriptor
    }
}

struct SocketActivationError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
