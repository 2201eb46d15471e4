import BlockDrivers
import BlockLayer
import FoundationEssentials
import Glibc
import NIOCore
import NIOPosix
import QCOW2

/// A short-lived graph for `strata img`: one loop, a small pool, the image
/// opened read-only, torn down after `body`.
final class ImageSession {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let pool = NIOThreadPool(numberOfThreads: 4)
    var loop: EventLoop { group.next() }
    private(set) var graph: BlockGraph!
    private(set) var io: FileIOContext!

    init() {
        pool.start()
    }

    /// Opens `filename` and runs `body` on the loop with the top node.
    func withImage<T>(_ filename: String, format: String?, forceShare: Bool, writable: Bool = false,
                      forRepair: Bool = false, forRepairAll: Bool = false, forCheck: Bool = false, openBacking: Bool = true, metadataOnly: Bool = false,
                      _ body: @escaping (BlockNode) -> EventLoopFuture<T>) throws -> T {
        defer {
            _ = try? loop.flatSubmit { () -> EventLoopFuture<[BlockError]> in
                self.graph?.closeGracefully() ?? self.loop.makeSucceededFuture([])
            }.wait()
            try? pool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
        }
        return try loop.flatSubmit { () -> EventLoopFuture<T> in
            self.graph = BlockGraph(eventLoop: self.loop)
            self.io = FileIOContext(eventLoop: self.loop, threadPool: self.pool)
            var options = ImageOptions(filename: filename, format: format)
            options.readOnly = !writable
            options.forceShare = forceShare
            options.forRepair = forRepair
            options.forCheck = forCheck
            options.forRepairAll = forRepairAll
            options.openBacking = openBacking
            options.metadataOnly = metadataOnly
            // The warnings qemu-img prints as it opens (a probed raw image
            // opened for writing, stale bitmaps).
            let warn = { (warning: ImageOpenWarning) in
                StandardError.write(warning.formatted(tool: "strata img") + "\n")
            }
            return ImageOpener.open(options, graph: self.graph, io: self.io, warn: warn).flatMap { node in
                // qemu-img takes consistent read and shares only reading.
                do {
                    let perm: BlockPermission = writable ? [.consistentRead, .write] : .consistentRead
                    _ = try self.graph.attachBackend(name: "qemu-img", to: node, perm: perm,
                                                     shared: forceShare ? .all : [.consistentRead, .writeUnchanged])
                } catch {
                    return self.loop.makeFailedFuture(error)
                }
                return body(node)
            }
        }.wait()
    }

    /// The file node under a format node, and its file name.
    static func fileName(of node: BlockNode) -> String {
        var current: BlockNode? = node
        while let candidate = current {
            if let file = candidate.driver as? FileDriver { return file.options.filename }
            current = candidate.child(named: "file")?.node
        }
        return node.name
    }

    /// The disk space of the image file, as qemu-img 7.2's "disk size":
    /// an external data file is not counted.
    static func allocatedBytes(of node: BlockNode) -> Int64 {
        var total: Int64 = 0
        var current: BlockNode? = node.child(named: "file")?.node ?? node
        while let candidate = current, total == 0 {
            total = candidate.driver.allocatedFileSize ?? 0
            current = candidate.child(named: "file")?.node
        }
        return total
    }
}

/// Prints errors the way qemu-img does and exits with its status.
func fail(_ message: String, status: Int32 = 1) -> Never {
    fail(lines: [message], status: status)
}

/// Prints an error with lines under it that are not error lines (QEMU's
/// hints), then exits with `status`.
func fail(_ message: String, hint: [String], status: Int32 = 1) -> Never {
    StandardError.write("strata img: \(message)\n" + hint.map { "\($0)\n" }.joined())
    exit(status)
}

/// Prints each line as an error line of its own (qemu-img reports some
/// errors in several), then exits with `status`.
func fail(lines: [String], status: Int32 = 1) -> Never {
    StandardError.write(lines.map { "strata img: \($0)\n" }.joined())
    exit(status)
}
