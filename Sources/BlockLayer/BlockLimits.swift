/// I/O limits of a node; the request path pads and splits to meet them.
public struct BlockLimits: Equatable, Sendable {
    /// Offsets and lengths must be multiples of this (512 or 4096 for
    /// O_DIRECT, 1 otherwise). Smaller requests are padded with
    /// read-modify-write.
    public var requestAlignment: Int = 1
    /// Buffers must start at a multiple of this (O_DIRECT).
    public var memoryAlignment: Int = 1
    /// Buffers that start at a multiple of this reach the device in the
    /// fewest pieces: the page size for O_DIRECT, as QEMU's
    /// `opt_mem_alignment`. A 4 KiB read into 512-aligned memory usually
    /// spans two pages, so the device gets two segments; on the benchmark
    /// VM's virtio disk that cost 5 µs more device time per read (QD1,
    /// 10.2K against 11.4K IOPS through the server, medians of 8 runs).
    /// Never less than `memoryAlignment` once the node has refreshed its
    /// limits, so a driver sets it only where it prefers more.
    public var optimalMemoryAlignment: Int = 1
    /// Largest single request the driver takes; 0 for no limit.
    public var maxTransfer: Int = 0
    /// Discards are rounded inward to this granularity.
    public var discardAlignment: Int = 1
    /// Write-zeroes work best in multiples of this.
    public var zeroAlignment: Int = 1

    public init() {}

    /// Combines a child's limits into a parent's, as a format over its file.
    public mutating func inherit(from child: BlockLimits) {
        requestAlignment = max(requestAlignment, child.requestAlignment)
        memoryAlignment = max(memoryAlignment, child.memoryAlignment)
        optimalMemoryAlignment = max(optimalMemoryAlignment, child.optimalMemoryAlignment)
        if child.maxTransfer != 0 {
            maxTransfer = maxTransfer == 0 ? child.maxTransfer : min(maxTransfer, child.maxTransfer)
        }
        discardAlignment = max(discardAlignment, child.discardAlignment)
        zeroAlignment = max(zeroAlignment, child.zeroAlignment)
    }
}
