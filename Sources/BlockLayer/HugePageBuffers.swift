import CHugePages
@_spi(CustomByteBufferAllocator) import NIOCore

/// Buffers for O_DIRECT transfers too long for scattered pages.
///
/// A block device takes a bounded number of memory segments per request
/// (virtio-blk: 254). A 1 MiB buffer of ordinary 4 KiB pages is 256
/// segments, so the kernel splits each 1 MiB O_DIRECT read in two (1016 KiB
/// and 8 KiB) and the disk sees twice the requests: on the benchmark VM,
/// 1 MiB reads at QD8 reached the disk as 509 KiB on average, and Strata
/// read 0.85× as fast as qemu-nbd. Buffers from here are 2 MiB transparent
/// huge pages where the kernel grants them, one segment each.
public enum HugePageBuffers {
    /// Every buffer from `allocator` starts at this alignment.
    public static let alignment = 4096
    /// Transfers from this length up to `longestTransfer` get a slab; up to
    /// 254 scattered pages, no device splits a transfer.
    public static let minimumTransfer = 254 * 4096 + 1
    public static let longestTransfer = 2 << 20

    /// ByteBuffers whose storage is a huge-page slab when their capacity is
    /// in the slab range, 4096-aligned memory otherwise.
    public static let allocator = ByteBufferAllocator(
        allocate: strata_huge_alloc, reallocate: strata_huge_realloc,
        deallocate: strata_huge_free, copy: strata_huge_copy)

    /// Whether a transfer of `length` bytes at memory `alignment` should
    /// use `allocator`.
    public static func suits(length: Int, alignment: Int) -> Bool {
        alignment > 1 && alignment <= Self.alignment && alignment & (alignment - 1) == 0
            && length >= minimumTransfer && length <= longestTransfer
    }

    /// Whether a buffer's storage is a huge-page slab.
    public static func isSlab(_ buffer: ByteBuffer) -> Bool {
        buffer.withUnsafeReadableBytes { strata_huge_is_slab($0.baseAddress) } != 0
    }
}
