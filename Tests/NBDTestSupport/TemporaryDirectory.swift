import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Runs `body` with a fresh directory of its own (for sockets and images),
/// removed with everything in it afterwards, however `body` ends.
///
/// Made under /tmp, not `$TMPDIR`: a unix socket's path must fit in 108
/// bytes.
public func withTemporaryDirectory<Result>(_ tag: String, _ body: (String) throws -> Result) throws -> Result {
    var template = "/tmp/strata-\(tag)-XXXXXX".utf8CString
    let directory = try template.withUnsafeMutableBufferPointer { buffer -> String in
        guard let made = mkdtemp(buffer.baseAddress!) else {
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        return String(cString: made)
    }
    defer { try? FileManager.default.removeItem(atPath: directory) }
    return try body(directory)
}
