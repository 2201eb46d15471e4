import BlockLayer
import CLinuxAIO
#if canImport(Glibc)
import Glibc
#endif

/// QEMU's image locking with OFD byte-range locks: byte 100 + bit is held
/// (shared) for each permission we hold, byte 200 + bit for each one we do
/// not share. Another process conflicts when it holds a byte we must not
/// see held. Because the offsets are QEMU's, qemu-img and Strata refuse
/// each other exactly as two QEMUs do.
struct ImageLocks {
    static let permBase: Int64 = 100
    static let sharedBase: Int64 = 200

    let fd: Int32
    let filename: String
    private(set) var perm: BlockPermission = []
    private(set) var unshared: BlockPermission = []

    init(fd: Int32, filename: String) {
        self.fd = fd
        self.filename = filename
    }

    /// Takes the locks for the new state, then checks others' locks; on a
    /// conflict, goes back to the old state and throws QEMU's message.
    mutating func apply(perm newPerm: BlockPermission, shared newShared: BlockPermission) throws {
        let oldPerm = perm
        let oldUnshared = unshared
        let newUnshared = BlockPermission.all.subtracting(newShared)
        if let error = setLocks(perm: newPerm, unshared: newUnshared) {
            _ = setLocks(perm: oldPerm, unshared: oldUnshared)
            throw error
        }
        if let error = check(perm: newPerm, unshared: newUnshared) {
            _ = setLocks(perm: oldPerm, unshared: oldUnshared)
            throw error
        }
        perm = newPerm
        unshared = newUnshared
    }

    private func setLocks(perm: BlockPermission, unshared: BlockPermission) -> BlockError? {
        for (bit, name) in BlockPermission.named {
            let index = Int64(bit.bitIndex)
            let permResult = strata_ofd_lock(fd, Self.permBase + index, 0, perm.contains(bit) ? 0 : 1)
            if permResult < 0 {
                return BlockError(errno: -permResult, "Failed to lock byte \(Self.permBase + index) (\(name))")
            }
            let sharedResult = strata_ofd_lock(fd, Self.sharedBase + index, 0, unshared.contains(bit) ? 0 : 1)
            if sharedResult < 0 {
                return BlockError(errno: -sharedResult, "Failed to lock byte \(Self.sharedBase + index) (\(name))")
            }
        }
        return nil
    }

    private func check(perm: BlockPermission, unshared: BlockPermission) -> BlockError? {
        for (bit, name) in BlockPermission.named {
            let index = Int64(bit.bitIndex)
            if perm.contains(bit), strata_ofd_lock_conflicts(fd, Self.sharedBase + index) == 1 {
                return conflict("Failed to get \"\(name)\" lock")
            }
            if unshared.contains(bit), strata_ofd_lock_conflicts(fd, Self.permBase + index) == 1 {
                return conflict("Failed to get shared \"\(name)\" lock")
            }
        }
        return nil
    }

    private func conflict(_ text: String) -> BlockError {
        BlockError(errno: EAGAIN, "\(text)\nIs another process using the image [\(filename)]?")
    }
}
