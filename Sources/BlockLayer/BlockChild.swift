/// Something that uses a node: another node or a `BlockBackend`.
public protocol BlockParent: AnyObject {
    /// How messages name this user ("node 'qcow2-0'", "export 'disk'").
    var parentDescription: String { get }
}

/// An edge of the graph: a parent's use of a child node, with the
/// permissions it holds and the ones it lets others hold.
public final class BlockChild {
    /// The child's name in its parent (`file`, `backing`, `root`).
    public let name: String
    public let role: BlockChildRole
    public unowned let parent: BlockParent
    /// The node used. Graph changes may swap it under a live parent.
    public internal(set) var node: BlockNode
    public internal(set) var perm: BlockPermission
    public internal(set) var shared: BlockPermission

    init(name: String, role: BlockChildRole, parent: BlockParent, node: BlockNode,
         perm: BlockPermission = [], shared: BlockPermission = .all) {
        self.name = name
        self.role = role
        self.parent = parent
        self.node = node
        self.perm = perm
        self.shared = shared
    }
}
