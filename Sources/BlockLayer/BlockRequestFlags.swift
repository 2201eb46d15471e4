/// Flags that travel with a request down the graph.
public struct BlockRequestFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Force unit access: the data is stable when the request completes.
    public static let fua = BlockRequestFlags(rawValue: 1 << 0)
    /// A write-zeroes may deallocate (punch a hole) instead of writing.
    public static let mayUnmap = BlockRequestFlags(rawValue: 1 << 1)
    /// A write-zeroes must fail with ENOTSUP rather than write zero buffers.
    public static let noFallback = BlockRequestFlags(rawValue: 1 << 2)
    /// The write does not change what readers see (copy-on-read, stream).
    public static let writeUnchanged = BlockRequestFlags(rawValue: 1 << 3)
}

/// What `discard` does on a node: qemu-nbd's `--discard`.
public enum DiscardMode: String, Sendable, CaseIterable {
    /// Discards are accepted and dropped (QEMU's default for qemu-nbd).
    case ignore
    /// Discards free space where the driver can.
    case unmap

    /// Parses QEMU's spellings (`off` is `ignore`, `on` is `unmap`).
    public init?(qemuName: String) {
        switch qemuName {
        case "ignore", "off": self = .ignore
        case "unmap", "on": self = .unmap
        default: return nil
        }
    }
}

/// qemu-nbd's `--detect-zeroes`: turn all-zero writes into write-zeroes.
public enum DetectZeroesMode: String, Sendable, CaseIterable {
    case off
    case on
    /// As `on`, and the zeroes may unmap when discard=unmap.
    case unmap
}
