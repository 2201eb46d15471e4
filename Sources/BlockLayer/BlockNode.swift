import NIOCore

/// A node of the block graph: a driver instance with its children, limits
/// and the state its request path needs (QEMU's BlockDriverState).
///
/// Confined to the graph's event loop. The request path lives in the
/// `BlockNode+*.swift` extensions; permissions and structure in `BlockGraph`.
public final class BlockNode: BlockParent {
    public let name: String
    public let driver: BlockDriver
    public unowned let graph: BlockGraph
    public internal(set) var options: BlockNodeOptions
    /// Edges to the nodes this one uses.
    public internal(set) var children: [BlockChild] = [] {
        didSet { primaryChild = children.first { $0.role.contains(.primary) } }
    }
    /// The child that holds this node's data (`file` for formats, the
    /// filtered child for filters). Kept with `children` rather than
    /// searched for: every read and write of a format node asks for it.
    public private(set) var primaryChild: BlockChild?
    /// Edges from the users of this node (nodes and backends).
    public internal(set) var parents: [BlockChild] = []
    public internal(set) var limits = BlockLimits()
    /// Cumulative permissions of all parents, as last applied.
    public internal(set) var perm: BlockPermission = []
    public internal(set) var shared: BlockPermission = .all

    var tracked = TrackedRequests()
    /// Completed writes; a flush makes everything up to its start stable.
    var writeGeneration: UInt64 = 0
    var flushedGeneration: UInt64 = 0
    var flushInFlight = false
    var flushWaiters: [BlockCompletion] = []

    init(name: String, driver: BlockDriver, graph: BlockGraph, options: BlockNodeOptions) {
        self.name = name
        self.driver = driver
        self.graph = graph
        self.options = options
    }

    public var eventLoop: EventLoop { graph.eventLoop }
    public var length: Int64 { driver.length }
    public var formatName: String { driver.formatName }
    public var parentDescription: String { "node '\(name)'" }

    public func child(named name: String) -> BlockChild? {
        children.first { $0.name == name }
    }

    /// The backing child, if this node has one.
    public var backing: BlockChild? { children.first { $0.role.contains(.cow) } }

    /// Recomputes limits from the children's and the driver's.
    public func refreshLimits() {
        var limits = BlockLimits()
        for child in children where !child.role.contains(.cow) {
            limits.inherit(from: child.node.limits)
        }
        driver.refreshLimits(&limits)
        limits.optimalMemoryAlignment = max(limits.optimalMemoryAlignment, limits.memoryAlignment)
        self.limits = limits
    }

    /// True if `[offset, offset + length)` lies within the node, counting the
    /// last partial alignment block as in: a parent padding a request for
    /// O_DIRECT may read (zeroes) or write up to the aligned end, as in QEMU.
    @inline(__always)
    func contains(offset: Int64, length: Int64) -> Bool {
        let end = alignUp(self.length, limits.requestAlignment)
        return offset >= 0 && length >= 0 && offset <= end && length <= end - offset
    }

    /// Ends a tracked write: counts it for flush coalescing and starts the
    /// requests that waited for it.
    func finishWrite(_ id: UInt64) {
        writeGeneration &+= 1
        let ready = tracked.end(id)
        for (newID, resume) in ready { resume(newID) }
    }

    /// Runs `body` once no overlapping request blocks `[start, end)`.
    @inline(__always)
    func track(start: Int64, end: Int64, serialising: Bool, _ body: @escaping (UInt64) -> Void) {
        if let id = tracked.tryBegin(start: start, end: end, serialising: serialising) {
            body(id)
        } else {
            tracked.wait(start: start, end: end, serialising: serialising, resume: body)
        }
    }
}
