/// A format, protocol or filter driver behind a `BlockNode`.
///
/// Drivers see only aligned, in-range requests: the node's request path
/// (`BlockNode+Read.swift` and friends) pads, bounces, serialises and
/// splits before calling them. All calls happen on the graph's event loop;
/// a completion may run before the call returns or later on the loop.
///
/// The required core is read, write, flush and length; the rest has
/// defaults that say "not supported", so a simple driver stays simple.
public protocol BlockDriver: AnyObject {
    /// The driver's name as QEMU spells it (`file`, `raw`, `qcow2`).
    var formatName: String { get }

    /// Called once the node and its children exist.
    func didAttach(to node: BlockNode)

    /// Guest-visible length in bytes.
    var length: Int64 { get }

    /// Bytes the node really occupies on disk (a sparse file's allocated
    /// blocks), if the driver knows.
    var allocatedFileSize: Int64? { get }

    /// Lets the driver state its limits; children's are already inherited.
    func refreshLimits(_ limits: inout BlockLimits)

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
              flags: BlockRequestFlags, completion: @escaping BlockCompletion)
    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer,
               flags: BlockRequestFlags, completion: @escaping BlockCompletion)
    /// Makes every completed write stable.
    func flush(completion: @escaping BlockCompletion)

    /// Request flags `write` honours itself; others (FUA) are emulated.
    var supportedWriteFlags: BlockRequestFlags { get }
    /// Request flags `writeZeroes` honours (FUA, may-unmap).
    var supportedZeroFlags: BlockRequestFlags { get }

    /// Whether `writeZeroes` also takes a piece narrower than the zero
    /// alignment (inside one aligned unit, and then possibly off the
    /// request alignment too), zeroing it without writing data where it
    /// can and answering ENOTSUP where it cannot. QEMU's qcow2 turns such
    /// a piece into a zero (sub)cluster when the rest of it reads as
    /// zeroes already, so a 4 KiB zero write into an empty image
    /// allocates nothing.
    var zeroesPartialUnits: Bool { get }
    /// Zeroes a range efficiently; ENOTSUP makes the caller write zero buffers.
    func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                     completion: @escaping BlockCompletion)
    /// Frees a range; ENOTSUP is treated as success (discard is advisory).
    func discard(at offset: Int64, length: Int64, completion: @escaping BlockCompletion)
    /// Allocation state from `offset`, for at most `length` bytes.
    func blockStatus(at offset: Int64, length: Int64,
                     completion: @escaping (Result<BlockStatus, BlockError>) -> Void)
    /// The file range holding `[offset, offset + length)` if all of it is
    /// plain data in one file's page cache, read as it is; nil otherwise,
    /// and then the caller reads. Must not block or do I/O.
    func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent?
    /// Hints that a range will be read soon (NBD_CMD_CACHE).
    func prefetch(at offset: Int64, length: Int64, completion: @escaping BlockCompletion)
    func truncate(to length: Int64, completion: @escaping BlockCompletion)

    /// Permissions this node needs on a child, given what its own parents
    /// take (`perm`) and allow (`shared`). The default is QEMU's by role.
    func childPermissions(for child: BlockChild, perm: BlockPermission, shared: BlockPermission,
                          node: BlockNode) -> (perm: BlockPermission, shared: BlockPermission)
    /// Applies the node's cumulative permissions (image locks). Throws, and
    /// leaves the previous state in place, if another process conflicts.
    func setPermissions(perm: BlockPermission, shared: BlockPermission) throws
    /// Called before a clean close, parents before children: write back
    /// what is cached and leave the image marked clean.
    func prepareToClose(completion: @escaping BlockCompletion)
    /// Releases resources; the node is gone.
    func close()
}

extension BlockDriver {
    public func didAttach(to node: BlockNode) {}
    public var allocatedFileSize: Int64? { nil }
    public func refreshLimits(_ limits: inout BlockLimits) {}
    public var supportedWriteFlags: BlockRequestFlags { [] }
    public var supportedZeroFlags: BlockRequestFlags { [] }
    public var zeroesPartialUnits: Bool { false }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                            completion: @escaping BlockCompletion) {
        completion(.enotsup)
    }

    public func discard(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        completion(.enotsup)
    }

    /// Without a driver answer, everything is data this node owns.
    public func blockStatus(at offset: Int64, length: Int64,
                            completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        completion(.success(BlockStatus(flags: [.data, .allocated], length: length)))
    }

    public func prefetch(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        completion(nil)
    }

    public func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? { nil }

    public func truncate(to length: Int64, completion: @escaping BlockCompletion) {
        completion(.enotsup)
    }

    public func childPermissions(for child: BlockChild, perm: BlockPermission, shared: BlockPermission,
                                 node: BlockNode) -> (perm: BlockPermission, shared: BlockPermission) {
        BlockPermissionPolicy.defaultPermissions(role: child.role, perm: perm, shared: shared,
                                                 nodeIsWritable: !node.options.readOnly)
    }

    public func setPermissions(perm: BlockPermission, shared: BlockPermission) throws {}
    public func prepareToClose(completion: @escaping BlockCompletion) {
        completion(nil)
    }

    public func close() {}
}
