import BlockLayer
import FoundationEssentials
import NIOCore
import QCOW2
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
    /// `-U`: share everything with other users of the files (see
    /// `FileDriverOptions.forceShare`); inherited by backing and data files.
    public var forceShare = false
    public var nodeName: String?
    /// Serve the image from this byte on (qemu-nbd's `--offset`).
    public var offset: Int64 = 0
    /// A qcow2 internal snapshot to serve read-only (qemu-nbd's `-l`).
    public var snapshot: SnapshotReference?
    /// QEMU's `l2-cache-size` for qcow2 nodes; nil for the default.
    public var l2CacheSize: Int?
    /// Opened by `check -r all`: a qcow2 refcount structure that can only be
    /// rebuilt does not fail the open (never inherited by backing files).
    public var forRepair = false
    /// Opened by `check` without `-r` (see `QCOW2Options.forCheck`).
    public var forCheck = false
    /// Opened by `check -r all` (see `QCOW2Options.forRepairAll`).
    public var forRepairAll = false
    /// False: the backing file is named but not opened (QEMU's
    /// BDRV_O_NO_BACKING, as `qemu-img info` opens images), so a missing
    /// backing file does not keep the image itself from being described.
    public var openBacking = true
    /// Only metadata will be read (QEMU's BDRV_O_NO_IO, as `qemu-img info`
    /// opens images): an external data file that cannot be opened does not
    /// fail the open, and any data request fails instead (`UnopenedFileDriver`).
    public var metadataOnly = false

    public init(filename: String, format: String? = nil) {
        self.filename = filename
        self.format = format
    }
}

/// Opens images into a graph: a `file` node, the format node above it,
/// and for qcow2 its external data file and backing chain.
public enum ImageOpener {
    /// Formats Strata can open today.
    public static let supportedFormats = ["raw", "qcow2"]
    /// Backing chains deeper than this are refused (a loop, or abuse).
    public static let maxChainDepth = 64

    /// Opens `options.filename` and returns the format node (for an
    /// `offset` into a qcow2 image, a raw window above it). Errors carry
    /// QEMU-style messages.
    public static func open(_ options: ImageOptions, graph: BlockGraph, io: FileIOContext,
                            warn: @escaping (ImageOpenWarning) -> Void = { _ in }) -> EventLoopFuture<BlockNode> {
        // Sharing writes with other users is only safe for a reader (QEMU
        // refuses it in every tool, `qemu-img check -r -U` included).
        guard options.readOnly || !options.forceShare else {
            return graph.eventLoop.makeFailedFuture(BlockError(errno: EINVAL,
                "force-share=on can only be used with read-only images"))
        }
        return open(options, graph: graph, io: io, warn: warn, depth: 0, above: []).flatMapThrowing { node in
            guard options.offset != 0, !(node.driver is RawDriver) else { return node }
            do {
                return try window(over: node, options: options, graph: graph)
            } catch {
                graph.removeNode(node)
                throw error
            }
        }
    }

    /// `--offset` must fall within what it is an offset into.
    private static func checkOffset(_ options: ImageOptions, within node: BlockNode) throws {
        guard options.offset >= 0, options.offset <= node.length else {
            throw BlockError(errno: EINVAL,
                "Offset \(options.offset) is past the end of '\(options.filename)' (\(node.length) bytes)")
        }
    }

    /// qemu-nbd's `--offset` over a format other than raw: a raw node with
    /// the offset above the format node, as qemu-nbd puts one (a raw image
    /// takes the offset into its file directly, in `openRaw`).
    private static func window(over node: BlockNode, options: ImageOptions, graph: BlockGraph) throws -> BlockNode {
        try checkOffset(options, within: node)
        let raw = RawDriver(offset: options.offset)
        return try graph.addNode(driver: raw, options: nodeOptions(options),
                                 children: [.init(name: "file", role: raw.fileRole, node: node)])
    }

    /// The device and inode of a file, to find a backing chain that leads
    /// back to one of its own images (nil when it cannot be stat'ed; the
    /// open then reports why).
    private static func fileIdentity(_ path: String) -> String? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return "\(info.st_dev):\(info.st_ino)"
    }

    /// `above` holds the identities of the images above this one in the chain.
    private static func open(_ options: ImageOptions, graph: BlockGraph, io: FileIOContext,
                             warn: @escaping (ImageOpenWarning) -> Void, depth: Int,
                             above: Set<String>) -> EventLoopFuture<BlockNode> {
        let loop = graph.eventLoop
        guard depth < maxChainDepth else {
            return loop.makeFailedFuture(BlockError(errno: ELOOP, "Backing file chain of '\(options.filename)' is too deep (a loop?)"))
        }
        var chain = above
        if let identity = fileIdentity(options.filename), !chain.insert(identity).inserted {
            return loop.makeFailedFuture(BlockError(errno: ELOOP, "Backing file chain loops: '\(options.filename)' is also an image above it"))
        }
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
            let known = ["qcow", "qed", "vmdk", "vpc", "vhdx", "vdi", "luks", "parallels", "bochs", "cloop"]
            let message = known.contains(format)
                ? "Image format '\(format)' of '\(options.filename)' is not supported (supported: \(supportedFormats.joined(separator: ", ")))"
                : "Unknown driver '\(format)'"
            return loop.makeFailedFuture(BlockError(errno: ENOTSUP, message))
        }
        if probed, format == "raw", !options.readOnly {
            warn(ImageOpenWarning("""
                WARNING: Image format was not specified for '\(options.filename)' and probing guessed raw.
                         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.
                         Specify the 'raw' format explicitly to remove the restrictions.
                """, isReport: false))
        }
        return openFile(options.filename, options: options, graph: graph, io: io).flatMap { fileNode in
            let opened: EventLoopFuture<BlockNode>
            switch format {
            case "qcow2":
                opened = openQCOW2(above: fileNode, options: options, graph: graph, io: io, warn: warn,
                                   depth: depth, chain: chain)
            default:
                opened = loop.makeCompletedFuture { try openRaw(above: fileNode, options: options, probed: probed, graph: graph) }
            }
            return opened.flatMapErrorThrowing { error in
                graph.removeNode(fileNode)
                throw error
            }
        }
    }

    private static func nodeOptions(_ options: ImageOptions) -> BlockNodeOptions {
        var nodeOptions = BlockNodeOptions(readOnly: options.readOnly, discard: options.discard)
        nodeOptions.ignoreFlush = options.cache.noFlush
        return nodeOptions
    }

    private static func openFile(_ filename: String, options: ImageOptions, graph: BlockGraph,
                                 io: FileIOContext) -> EventLoopFuture<BlockNode> {
        var fileOptions = FileDriverOptions(filename: filename, readOnly: options.readOnly,
                                            direct: options.cache.direct, aio: options.aio, locking: options.locking)
        fileOptions.forceShare = options.forceShare
        return FileDriver.open(fileOptions, io: io).flatMapThrowing { driver in
            do {
                return try graph.addNode(driver: driver, options: nodeOptions(options))
            } catch {
                driver.close()
                throw error
            }
        }
    }

    private static func openRaw(above fileNode: BlockNode, options: ImageOptions, probed: Bool,
                                graph: BlockGraph) throws -> BlockNode {
        try checkOffset(options, within: fileNode)
        if options.snapshot != nil {
            throw BlockError(errno: ENOTSUP, "Block format 'raw' does not support internal snapshots")
        }
        let raw = RawDriver(offset: options.offset, probed: probed && !options.readOnly)
        var formatOptions = nodeOptions(options)
        formatOptions.detectZeroes = options.detectZeroes
        return try graph.addNode(name: options.nodeName, driver: raw, options: formatOptions,
                                 children: [.init(name: "file", role: raw.fileRole, node: fileNode)])
    }

    private static func openQCOW2(above fileNode: BlockNode, options: ImageOptions, graph: BlockGraph,
                                  io: FileIOContext, warn: @escaping (ImageOpenWarning) -> Void,
                                  depth: Int, chain: Set<String>) -> EventLoopFuture<BlockNode> {
        let loop = graph.eventLoop
        var qcowOptions = QCOW2Options(readOnly: options.readOnly, snapshot: options.snapshot,
                                       l2CacheSize: options.l2CacheSize, forRepair: options.forRepair,
                                       forCheck: options.forCheck)
        qcowOptions.forRepairAll = options.forRepairAll
        return QCOW2Driver.open(file: fileNode, options: qcowOptions).flatMap { driver in
            let header = driver.header
            if driver.openedWithStaleBitmaps { warn(.staleBitmaps(version: header.version)) }
            let directory = directory(of: options.filename)
            var children: [BlockGraph.ChildSpec] = [.init(name: "file", role: .image, node: fileNode)]
            var opening: [EventLoopFuture<Void>] = []
            if header.incompatibleFeatures.contains(.externalDataFile) {
                // QEMU opens a relative data file name from the current
                // directory (unlike backing files); do the same. Without a
                // name QEMU needs one given; only a look at the metadata
                // (qemu-img info) goes ahead.
                let missing = BlockError(errno: EINVAL, "'data-file' is required for this image")
                guard header.dataFile != nil || options.metadataOnly else { return loop.makeFailedFuture(missing) }
                var dataFile = header.dataFile.map { openFile($0, options: options, graph: graph, io: io) }
                    ?? loop.makeFailedFuture(missing)
                if options.metadataOnly {
                    // Shown even when missing, as qemu-img info shows it; its
                    // place is held so that no data is read from elsewhere.
                    dataFile = dataFile.flatMapErrorThrowing { error in
                        let reason = error as? BlockError ?? BlockError(errno: EIO, "\(error)")
                        return try graph.addNode(driver: UnopenedFileDriver(error: reason), options: nodeOptions(options))
                    }
                }
                opening.append(dataFile.map { node in
                    children.append(.init(name: "data-file", role: [.data], node: node))
                })
            } else if header.autoclearFeatures.contains(.rawExternalData), !options.metadataOnly {
                return loop.makeFailedFuture(BlockError(errno: EINVAL, "data-file-raw requires a data file"))
            }
            if options.openBacking, let backingName = header.backingFile, !backingName.isEmpty {
                guard !backingName.hasPrefix("json:") else {
                    return loop.makeFailedFuture(BlockError(errno: ENOTSUP, "json: backing file names are not supported"))
                }
                var backingOptions = ImageOptions(filename: resolve(backingName, relativeTo: directory),
                                                  format: header.backingFormat)
                backingOptions.readOnly = true
                backingOptions.cache = options.cache
                backingOptions.aio = options.aio
                backingOptions.locking = options.locking
                backingOptions.forceShare = options.forceShare
                backingOptions.metadataOnly = options.metadataOnly
                opening.append(open(backingOptions, graph: graph, io: io, warn: warn, depth: depth + 1, above: chain)
                    .flatMapErrorThrowing { error in
                        throw BlockError(errno: (error as? BlockError)?.errno ?? EIO,
                            "Could not open backing file: \((error as? BlockError)?.description ?? "\(error)")")
                    }
                    .map { node in children.append(.init(name: "backing", role: .backing, node: node)) })
            }
            // Wait for all, so that on a failure what did open can be removed.
            let outcomes = opening.map { $0.map { Optional<Error>.none }.recover { Optional($0) } }
            return EventLoopFuture.whenAllSucceed(outcomes, on: loop).flatMapThrowing { errors in
                if let error = errors.compactMap({ $0 }).first {
                    for child in children.dropFirst() { graph.removeNode(child.node) }
                    throw error
                }
                var formatOptions = nodeOptions(options)
                formatOptions.detectZeroes = options.detectZeroes
                formatOptions.readOnly = options.readOnly || options.snapshot != nil
                do {
                    return try graph.addNode(name: options.nodeName, driver: driver, options: formatOptions,
                                             children: children)
                } catch {
                    for child in children.dropFirst() { graph.removeNode(child.node) }
                    throw error
                }
            }
        }
    }

    /// The directory part of `path`, as Foundation's
    /// `deletingLastPathComponent` gives it: "" for a bare name, "/" for a
    /// name in the root, and no trailing slash otherwise. Worked on bytes:
    /// a "/" followed by a combining mark is still a separator.
    public static func directory(of path: String) -> String {
        let slash = UInt8(ascii: "/")
        var bytes = Array(path.utf8)[...]
        while bytes.count > 1, bytes.last == slash { bytes = bytes.dropLast() }
        guard let last = bytes.lastIndex(of: slash) else { return "" }
        var directory = bytes[..<last]
        while directory.last == slash { directory = directory.dropLast() }
        return directory.isEmpty ? "/" : String(decoding: directory, as: UTF8.self)
    }

    /// QEMU resolves relative backing and data file names against the
    /// directory of the image that names them.
    public static func resolve(_ name: String, relativeTo directory: String) -> String {
        if name.hasPrefix("/") || directory.isEmpty { return name }
        // The root directory already ends in one ("/base", not "//base").
        return directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    /// Reads the first bytes of `path` and names the format they show.
    static func probe(_ path: String) -> Result<String, BlockError> {
        let fd: Int32
        switch ImageFile.open(path, flags: O_RDONLY | O_CLOEXEC) {
        case .success(let opened): fd = opened
        case .failure(let error): return .failure(error)
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
