import Glibc

/// The process's standard error: each message goes out whole, unbuffered,
/// so that it is in place even if the process dies right after.
enum StandardError {
    static func write(_ text: String) {
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let written = bytes.withUnsafeBytes { Glibc.write(STDERR_FILENO, $0.baseAddress! + offset, $0.count - offset) }
            if written < 0, errno == EINTR { continue }
            // Nowhere to report a failure to report: stderr closed or gone.
            if written <= 0 { return }
            offset += written
        }
    }
}
