/// QEMU's default rules for the permissions a parent takes on a child,
/// decided by the child's role.
public enum BlockPermissionPolicy {
    public static func defaultPermissions(
        role: BlockChildRole, perm: BlockPermission, shared: BlockPermission, nodeIsWritable: Bool
    ) -> (perm: BlockPermission, shared: BlockPermission) {
        if role.contains(.filtered) {
            // A filter shows its child unchanged: pass everything through.
            return (perm, shared)
        }
        if role.contains(.cow) {
            // A backing file is only read, and only for consistent reads. If
            // the parent tolerates writers, so does the backing file.
            var childShared: BlockPermission = shared.contains(.write) ? [.write, .resize] : []
            childShared.formUnion([.consistentRead, .writeUnchanged])
            return (perm.intersection(.consistentRead), childShared)
        }
        // Storage: the child holds this node's data and/or metadata.
        var childPerm = perm
        var childShared = shared
        if nodeIsWritable {
            // A writable format may need to write or grow its file even when
            // its own users only read (metadata, lazy refcount repair).
            childPerm.formUnion([.write, .resize])
        }
        if role.contains(.metadata) {
            // Nobody may change the tables under us, and we need to read them.
            childPerm.insert(.consistentRead)
            if childPerm.contains(.writeUnchanged) { childPerm.insert(.write) }
            childShared.subtract([.write, .resize])
        }
        if role.contains(.data), childPerm.contains(.writeUnchanged) {
            childPerm.insert(.write)
        }
        return (childPerm, childShared)
    }
}
