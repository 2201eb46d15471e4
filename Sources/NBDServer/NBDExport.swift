import BlockLayer
import NBDProtocol
#if canImport(Glibc)
import Glibc
#endif

/// An export: a name on the NBD server bound to a `BlockBackend`.
public final class NBDExport {
    public let name: String
    public let description: String
    public let backend: BlockBackend
    public let readOnly: Bool
    /// Offer `qemu:allocation-depth` (qemu-nbd's `-A`).
    public let allocationDepth: Bool
    /// Offer CAN_MULTI_CONN: true when several connections may use the
    /// export at once. Every connection reaches the same node, so a flush on
    /// one covers writes completed on all of them.
    public let multiConn: Bool

    public init(name: String, description: String = "", backend: BlockBackend, readOnly: Bool,
                allocationDepth: Bool = false, multiConn: Bool = false) {
        self.name = name
        self.description = description
        self.backend = backend
        self.readOnly = readOnly
        self.allocationDepth = allocationDepth
        self.multiConn = multiConn
    }

    public static let baseAllocation = "base:allocation"
    public static let qemuAllocationDepth = "qemu:allocation-depth"

    /// The protocol's view of this export.
    public var descriptor: NBDExportDescriptor {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendDF, .sendCache]
        if readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if multiConn { flags.insert(.canMultiConn) }
        var contexts = [Self.baseAllocation]
        if allocationDepth { contexts.append(Self.qemuAllocationDepth) }
        return NBDExportDescriptor(name: name, description: description, size: UInt64(max(0, backend.length)),
                                   transmissionFlags: flags, metaContexts: contexts)
    }
}

extension NBDError {
    /// The wire error for a block-layer errno. The spec reserves ENOTSUP
    /// for FAST_ZERO and EOVERFLOW for DF reads, and asks servers to avoid
    /// ENOMEM, so those become EINVAL or EIO elsewhere.
    public init(_ error: BlockError, for request: NBDRequest) {
        switch error.errno {
        case EPERM, EROFS, EACCES: self = .eperm
        case ENOSPC, EDQUOT, EFBIG: self = .enospc
        case EINVAL: self = .einval
        case ENOTSUP, EOPNOTSUPP:
            self = request.flags.contains(.fastZero) ? .enotsup : .einval
        case EOVERFLOW:
            self = request.flags.contains(.dontFragment) ? .eoverflow : .einval
        case ESHUTDOWN: self = .eshutdown
        default: self = .eio
        }
    }
}
