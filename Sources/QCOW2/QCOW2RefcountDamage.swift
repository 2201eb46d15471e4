import BlockLayer
#if canImport(Glibc)
import Glibc
#endif

/// Why the refcount structure on disk cannot be loaded for writing.
///
/// An ordinary read-write open refuses the image with `blockError`. Opened
/// for `check -r`, the damage is tolerated instead: `-r all` rebuilds the
/// table and blocks from the other metadata before repairing anything else.
public enum QCOW2RefcountDamage: Error, Equatable, Sendable {
    /// The table reaches past the end of the file (qemu-img reads it as
    /// zeroes: every refcount is lost).
    case tablePastEnd
    /// A table entry names a block past the end of the file.
    case blockPastEnd(UInt64)
    /// A table entry is not cluster-aligned or lies beyond any valid offset.
    /// (qemu-img's rebuild gives up on a misaligned block, as it marked
    /// the image corrupt on reading it; Strata's rebuild does not need it.)
    case blockMisplaced(UInt64)
    /// Two table entries name the same block.
    case blockShared(UInt64)
    /// A block, or a cluster of the table, is also the header, an L1 or
    /// L2 table, or a snapshot table.
    case overlapsMetadata(UInt64)

    public var message: String {
        switch self {
        case .tablePastEnd:
            return "Refcount table lies past the end of the image"
        case .blockPastEnd(let offset), .blockMisplaced(let offset):
            return "Refcount block at 0x\(String(offset, radix: 16)) is invalid"
        case .blockShared(let offset):
            return "Refcount block at 0x\(String(offset, radix: 16)) is named by more than one refcount table entry"
        case .overlapsMetadata(let offset):
            return "Refcount structure at 0x\(String(offset, radix: 16)) overlaps other metadata"
        }
    }

    public var blockError: BlockError { BlockError(errno: EIO, message) }
}
