import BlockLayer
#if canImport(Glibc)
import Glibc
#endif

/// The `raw` format: the file's bytes as they are, optionally a window of
/// them (`offset`, `size`).
///
/// When the format was probed rather than given, writes to the first 512
/// bytes that would make the image probe as another format are refused
/// with EPERM, as QEMU does: otherwise a guest could turn a raw image into,
/// say, a qcow2 header naming any host file as its backing file.
public final class RawDriver: BlockDriver {
    public let formatName = "raw"
    public let offset: Int64
    public let explicitSize: Int64?
    public let probed: Bool
    private weak var node: BlockNode?

    public init(offset: Int64 = 0, size: Int64? = nil, probed: Bool = false) {
        self.offset = offset
        self.explicitSize = size
        self.probed = probed
    }

    /// The child role: plain raw is a filter over its file; a window holds data.
    public var fileRole: BlockChildRole {
        offset == 0 && explicitSize == nil ? .filteredPrimary : [.data, .primary]
    }

    public func didAttach(to node: BlockNode) {
        self.node = node
    }

    private var file: BlockNode { node!.primaryChild!.node }

    /// A window ends where its file does, not on a sector boundary:
    /// qemu-nbd 7.2 rounds an `--offset` window up to whole sectors and
    /// aborts when a client reads the rounded tail.
    public var length: Int64 {
        guard let node, let child = node.primaryChild else { return 0 }
        if let explicitSize { return explicitSize }
        return max(0, child.node.length - offset)
    }

    public func refreshLimits(_ limits: inout BlockLimits) {
        if probed {
            // Writes to sector 0 must arrive whole so they can be probed.
            limits.requestAlignment = max(limits.requestAlignment, FormatProbe.probeSize)
        }
    }

    public var supportedWriteFlags: BlockRequestFlags { [.fua] }
    public var supportedZeroFlags: BlockRequestFlags { [.fua, .mayUnmap] }

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        file.read(at: self.offset + offset, into: buffer, flags: flags, completion: completion)
    }

    public func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        file.cachedFileExtent(at: self.offset + offset, length: length)
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                      flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        if probed, offset < Int64(FormatProbe.probeSize) {
            // The padding path guarantees offset 0 and at least one sector.
            guard offset == 0, buffer.count >= FormatProbe.probeSize else { return completion(.einval) }
            let head = UnsafeRawBufferPointer(rebasing: buffer[0..<FormatProbe.probeSize])
            if let format = FormatProbe.detect(head), format != "raw" {
                return completion(BlockError(errno: EPERM))
            }
        }
        file.write(at: self.offset + offset, from: buffer, flags: flags, completion: completion)
    }

    public func flush(completion: @escaping BlockCompletion) {
        file.flush(completion: completion)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                            completion: @escaping BlockCompletion) {
        file.writeZeroes(at: self.offset + offset, length: length, flags: flags, completion: completion)
    }

    public func discard(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        file.discard(at: self.offset + offset, length: length, completion: completion)
    }

    public func prefetch(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        file.prefetch(at: self.offset + offset, length: length, completion: completion)
    }

    public func blockStatus(at offset: Int64, length: Int64,
                            completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        let base = self.offset
        // Over a file, the file's own status; over a format node (the
        // window of `--offset` on a qcow2 image), what its whole backing
        // chain reads as, so unallocated clusters stay holes that read as
        // zeroes, as through qemu-nbd.
        file.blockStatusAbove(at: base + offset, length: length) { result in
            completion(result.map { status in
                var status = status
                // Raw has no backing file: whatever the file says, this layer owns it.
                status.flags.insert(.allocated)
                return status
            })
        }
    }

    public func truncate(to length: Int64, completion: @escaping BlockCompletion) {
        guard offset == 0, explicitSize == nil else { return completion(.enotsup) }
        file.driver.truncate(to: length, completion: completion)
    }
}
