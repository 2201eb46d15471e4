/// The permission transaction: compute, check, apply or roll back.
extension BlockGraph {
    /// Nodes ordered so that every parent comes before its children.
    func topologicalOrder() -> [BlockNode] {
        var order: [BlockNode] = []
        var visited: Set<ObjectIdentifier> = []
        func visit(_ node: BlockNode) {
            guard visited.insert(ObjectIdentifier(node)).inserted else { return }
            for edge in node.children { visit(edge.node) }
            order.append(node)
        }
        for node in nodes { visit(node) }
        return order.reversed()
    }

    /// Recomputes every edge's permissions from the backends down, checks
    /// that no user takes what another does not share, and applies the
    /// result to the drivers (image locks). All or nothing.
    public func refreshPermissions() throws {
        let order = topologicalOrder()
        var edgePerms: [ObjectIdentifier: (BlockPermission, BlockPermission)] = [:]
        var nodePerms: [(BlockNode, BlockPermission, BlockPermission)] = []

        func permissions(of edge: BlockChild) -> (BlockPermission, BlockPermission) {
            edgePerms[ObjectIdentifier(edge)] ?? (edge.perm, edge.shared)
        }

        for node in order {
            let incoming = node.parents
            for (index, edge) in incoming.enumerated() {
                let (perm, _) = permissions(of: edge)
                if perm.contains(.write) || perm.contains(.resize), node.options.readOnly {
                    throw BlockError(errno: 1, "Block node '\(node.name)' is read-only")
                }
                for (otherIndex, other) in incoming.enumerated() where otherIndex != index {
                    let (_, otherShared) = permissions(of: other)
                    let denied = perm.subtracting(otherShared)
                    if !denied.isEmpty {
                        throw BlockError(errno: 1,
                            "Conflicts with use by \(other.parent.parentDescription) as '\(other.name)', "
                            + "which does not allow '\(denied)' on \(node.parentDescription) "
                            + "(wanted by \(edge.parent.parentDescription))")
                    }
                }
            }
            var perm: BlockPermission = []
            var shared: BlockPermission = .all
            for edge in incoming {
                let (edgePerm, edgeShared) = permissions(of: edge)
                perm.formUnion(edgePerm)
                shared.formIntersection(edgeShared)
            }
            nodePerms.append((node, perm, shared))
            for child in node.children {
                let computed = node.driver.childPermissions(for: child, perm: perm, shared: shared, node: node)
                edgePerms[ObjectIdentifier(child)] = (computed.perm, computed.shared)
            }
        }

        // Apply to drivers; roll back the ones already changed on failure.
        var applied: [(BlockNode, BlockPermission, BlockPermission)] = []
        do {
            for (node, perm, shared) in nodePerms where node.perm != perm || node.shared != shared {
                try node.driver.setPermissions(perm: perm, shared: shared)
                applied.append((node, node.perm, node.shared))
                node.perm = perm
                node.shared = shared
            }
        } catch {
            for (node, oldPerm, oldShared) in applied.reversed() {
                try? node.driver.setPermissions(perm: oldPerm, shared: oldShared)
                node.perm = oldPerm
                node.shared = oldShared
            }
            throw error
        }
        for node in order {
            for child in node.children {
                if let (perm, shared) = edgePerms[ObjectIdentifier(child)] {
                    child.perm = perm
                    child.shared = shared
                }
            }
        }
    }
}
