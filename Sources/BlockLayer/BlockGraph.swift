import NIOCore

/// The graph of nodes and their users, owned by one event loop.
///
/// Every structural change (a node added, a backend attached, a child
/// swapped) ends with `refreshPermissions()`, which recomputes what every
/// edge takes and shares, checks conflicts and applies image locks as one
/// transaction: on any failure nothing changes.
public final class BlockGraph {
    public let eventLoop: EventLoop
    public private(set) var nodes: [BlockNode] = []
    public private(set) var backends: [BlockBackend] = []
    /// Bounce buffers for every node of this graph.
    public let bufferPool = AlignedBufferPool()
    private var nextAutoName = 0

    public init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    /// A node's child as given to `addNode`.
    public struct ChildSpec {
        public var name: String
        public var role: BlockChildRole
        public var node: BlockNode
        public init(name: String, role: BlockChildRole, node: BlockNode) {
            self.name = name
            self.role = role
            self.node = node
        }
    }

    public func node(named name: String) -> BlockNode? {
        nodes.first { $0.name == name }
    }

    /// QEMU's form of generated node names.
    private func generateNodeName() -> String {
        while true {
            nextAutoName += 1
            let name = "#block\(nextAutoName)"
            if node(named: name) == nil { return name }
        }
    }

    /// Adds a node above `children`; fails without changing the graph if the
    /// name is taken or permissions conflict.
    @discardableResult
    public func addNode(name: String? = nil, driver: BlockDriver, options: BlockNodeOptions = BlockNodeOptions(),
                        children: [ChildSpec] = []) throws -> BlockNode {
        if let name {
            guard BlockGraph.isValidNodeName(name) else {
                throw BlockError(errno: 22, "Invalid node-name: '\(name)'")
            }
            guard node(named: name) == nil else {
                throw BlockError(errno: 22, "Duplicate nodes with node-name='\(name)'")
            }
        }
        let node = BlockNode(name: name ?? generateNodeName(), driver: driver, graph: self, options: options)
        for spec in children {
            let edge = BlockChild(name: spec.name, role: spec.role, parent: node, node: spec.node)
            node.children.append(edge)
            spec.node.parents.append(edge)
        }
        nodes.append(node)
        node.refreshLimits()
        do {
            try refreshPermissions()
        } catch {
            unlink(node)
            throw error
        }
        driver.didAttach(to: node)
        return node
    }

    /// Removes a node nobody uses, and then its children nobody else uses.
    public func removeNode(_ node: BlockNode) {
        guard node.parents.isEmpty, nodes.contains(where: { $0 === node }) else { return }
        let children = node.children.map(\.node)
        unlink(node)
        node.driver.close()
        try? refreshPermissions()
        for child in children where child.parents.isEmpty { removeNode(child) }
    }

    private func unlink(_ node: BlockNode) {
        for edge in node.children {
            edge.node.parents.removeAll { $0 === edge }
        }
        node.children.removeAll()
        nodes.removeAll { $0 === node }
    }

    /// Attaches a new backend to `node` with the given permissions.
    public func attachBackend(name: String, to node: BlockNode, perm: BlockPermission,
                              shared: BlockPermission) throws -> BlockBackend {
        let backend = BlockBackend(name: name, graph: self)
        let edge = BlockChild(name: "root", role: .filteredPrimary, parent: backend, node: node,
                              perm: perm, shared: shared)
        backend.root = edge
        node.parents.append(edge)
        backends.append(backend)
        do {
            try refreshPermissions()
        } catch {
            node.parents.removeAll { $0 === edge }
            backends.removeAll { $0 === backend }
            backend.root = nil
            throw error
        }
        return backend
    }

    /// Detaches a backend, dropping its permissions (and releasing locks).
    public func detachBackend(_ backend: BlockBackend) {
        if let edge = backend.root {
            edge.node.parents.removeAll { $0 === edge }
        }
        backend.root = nil
        backends.removeAll { $0 === backend }
        try? refreshPermissions()
    }

    /// Quiesces every backend above `node` and succeeds when none has a
    /// request in flight. Pair with `endDrain(_:)`.
    public func beginDrain(_ node: BlockNode) -> EventLoopFuture<Void> {
        let futures = backends(above: node).map { $0.beginDrain() }
        return EventLoopFuture.andAllSucceed(futures, on: eventLoop)
    }

    public func endDrain(_ node: BlockNode) {
        backends(above: node).forEach { $0.endDrain() }
    }

    /// Backends whose root reaches `node`.
    public func backends(above node: BlockNode) -> [BlockBackend] {
        var found: [BlockBackend] = []
        var seen: Set<ObjectIdentifier> = []
        func visit(_ node: BlockNode) {
            guard seen.insert(ObjectIdentifier(node)).inserted else { return }
            for edge in node.parents {
                if let backend = edge.parent as? BlockBackend {
                    if !found.contains(where: { $0 === backend }) { found.append(backend) }
                } else if let parent = edge.parent as? BlockNode {
                    visit(parent)
                }
            }
        }
        visit(node)
        return found
    }

    /// Lets every driver write back and mark its image clean (top down),
    /// then closes every node. Errors are reported but do not stop the close.
    public func closeGracefully() -> EventLoopFuture<[BlockError]> {
        var errors: [BlockError] = []
        let order = topologicalOrder()
        func next(_ index: Int) -> EventLoopFuture<Void> {
            guard index < order.count else { return eventLoop.makeSucceededVoidFuture() }
            let promise = eventLoop.makePromise(of: Void.self)
            order[index].driver.prepareToClose { error in
                if let error { errors.append(error) }
                promise.succeed(())
            }
            return promise.futureResult.flatMap { next(index + 1) }
        }
        return next(0).map {
            self.closeAll()
            return errors
        }
    }

    /// Closes every node, top down, without writing anything back.
    public func closeAll() {
        for backend in backends { detachBackend(backend) }
        while let top = nodes.first(where: { $0.parents.isEmpty }) {
            removeNode(top)
        }
    }

    /// QEMU's node-name rule: a letter first, then letters, digits, '-', '.', '_'; at most 31 bytes.
    public static func isValidNodeName(_ name: String) -> Bool {
        guard let first = name.unicodeScalars.first, name.utf8.count <= 31,
              first.isASCII, first.properties.isAlphabetic else { return false }
        return name.unicodeScalars.allSatisfy {
            $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || "-._".unicodeScalars.contains($0))
        }
    }
}
