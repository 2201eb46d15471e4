import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Everything needed to open an image the way qemu-nbd does from its
/// command line: a `file` node and a format node above it.
public struct ImageOptions: Sendable {
    public var filename: String
    /// nil: probe, and restrict writes to sector 0 if it probes as raw.
    public var format: String?
    public var readOnly = false
    public var cache: CacheMode = .writeback
    public var aio: FileAIOMode = .threads
    public var discard: DiscardMode = .ignore
    public var detectZeroes: DetectZeroesMode = .off
    public var locking: FileLockingMode = .auto
    public var nodeName: String?
    /// Serve the image from this byte on (qemu-nbd's `--offset`).
    public var offset: Int64 = 0

    public init(filename: String, format: String? = nil) {
        self.filename = filename
        self.format = format
    }
}

/// Opens images into a graph.
public enum ImageOpener {
    /// Formats Strata can open today.
    public static let supportedFormats = ["raw"]

    /// Opens `options.filename` as a file node with the format node on top
    /// and returns the format node. Errors carry QEMU-style messages.
    public static func open(_ options: ImageOptions, graph: BlockGraph, io: FileIOContext,
                            warn: @escaping (String) -> Void = { _ in }) -> EventLoopFuture<BlockNode> {
        let loop = graph.eventLoop
        let format: String
        let probed: Bool
        if let given = options.format {
            format = given
            probed = false
        } else {
            switch probe(options.filename) {
            case .success(let detected):
                format = detected
                probed = true
            case .failure(let error):
                return loop.makeFailedFuture(error)
            }
        }
        guard supportedFormats.contains(format) else {
            let known = ["qcow2", "qcow", "qed", "vmdk", "vpc", "vhdx", "vdi", "luks", "parallels", "bochs", "cloop"]
            let message = known.contains(format)
                ? "Image format '\(format)' of '\(options.filename)' is not supported yet (supported: \(supportedFormats.joined(separator: ", ")))"
                : "Unknown driver '\(format)'"
            return loop.makeFailedFuture(BlockError(errno: ENOTSUP, message))
        }
        if probed, format == "raw" {
            warn("""
                WARNING: Image format was not specified for '\(options.filename)' and probing guessed raw.
                         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
                         Specify the 'raw' format explicitly to remove the restrictions.
                """)
        }
        let fileOptions = FileDriverOptions(filename: options.filename, readOnly: options.readOnly,
                                            direct: options.cache.direct, aio: options.aio, locking: options.locking)
        return FileDriver.open(fileOptions, io: io).flatMapThrowing { driver in
            var fileNodeOptions = BlockNodeOptions(readOnly: options.readOnly, discard: options.discard)
            fileNodeOptions.ignoreFlush = options.cache.noFlush
            let fileNode: BlockNode
            do {
                fileNode = try graph.addNode(driver: driver, options: fileNodeOptions)
            } catch {
                driver.close()
                throw error
            }
            guard options.offset >= 0, options.offset <= driver.length else {
                graph.removeNode(fileNode)
                throw BlockError(errno: EINVAL,
                    "Offset \(options.offset) is past the end of '\(options.filename)' (\(driver.length) bytes)")
            }
            let raw = RawDriver(offset: options.offset, probed: probed)
            var formatOptions = fileNodeOptions
            formatOptions.detectZeroes = options.detectZeroes
            do {
                return try graph.addNode(name: options.nodeName, driver: raw, options: formatOptions,
                                         children: [.init(name: "file", role: raw.fileRole, node: fileNode)])
            } catch {
                graph.removeNode(fileNode)
                throw error
            }
        }
    }

    /// Reads the first bytes of `path` and names the format they show.
    static func probe(_ path: String) -> Result<String, BlockError> {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let error = errno
            return .failure(BlockError(errno: error, "Could not open '\(path)': \(String(cString: strerror(error)))"))
        }
        defer { Glibc.close(fd) }
        var head = [UInt8](repeating: 0, count: FormatProbe.probeSize)
        let count = head.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        guard count >= 0 else {
            let error = errno
            return .failure(BlockError(errno: error, "Could not read '\(path)': \(String(cString: strerror(error)))"))
        }
        return .success(FormatProbe.detect(Array(head[0..<count])) ?? "raw")
    }
}
