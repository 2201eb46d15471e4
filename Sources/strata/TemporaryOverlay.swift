import BlockLayer
import FoundationEssentials
import QCOW2
#if canImport(Glibc)
import Glibc
#endif

/// `serve -s` (qemu-nbd's `--snapshot`): clients write to a temporary qcow2
/// overlay whose backing file is the image, so the image itself never
/// changes. As in QEMU the overlay is made in `$TMPDIR` (default
/// /var/tmp) and named `vl.XXXXXX`; the server unlinks it as soon as it is
/// open, so nothing is left behind however the server ends.
enum TemporaryOverlay {
    /// Creates the overlay over `filename` and returns its path.
    static func create(over filename: String, format: String?) throws -> String {
        // The overlay lives elsewhere: it must name its backing file absolutely.
        let backing = filename.hasPrefix("/") ? filename
            : FileManager.default.currentDirectoryPath + "/" + filename
        let (length, backingFormat) = try ImageSession().withImage(backing, format: format, forceShare: true) { node in
            node.eventLoop.makeSucceededFuture((node.length, node.formatName))
        }
        var options = QCOW2ImageBuilder.Options(size: UInt64(length))
        options.backingFile = backing
        options.backingFormat = backingFormat
        let layout = try QCOW2ImageBuilder(options: options).build()

        let directory = ProcessInfo.processInfo.environment["TMPDIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/var/tmp"
        var template = Array("\(directory)/vl.XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else {
            throw BlockError(errno: errno, "Could not create temporary overlay in '\(directory)': \(String(cString: strerror(errno)))")
        }
        defer { close(fd) }
        let path = String(cString: template)
        do {
            try layout.write(to: fd)
        } catch {
            unlink(path)
            throw error
        }
        return path
    }
}
