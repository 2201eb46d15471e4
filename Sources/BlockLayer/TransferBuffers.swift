import CHugePages
@_spi(CustomByteBufferAllocator) import NIOCore

/// Buffers for READ and WRITE data, from one allocator: long transfers get
/// chunks of 2 MiB transparent huge pages, short ones (4 to 32 KiB) buffers
/// recycled per size class (see CHugePages.h and short_buffers.c), and
/// every buffer starts on a page, so O_DIRECT needs no padding.
///
/// Long transfers want huge pages because each chunk is then one
/// physically contiguous segment. A block device takes a bounded number of memory segments per request
/// (virtio-blk: 254). A 1 MiB buffer of ordinary 4 KiB pages is 256
/// segments, so the kernel splits each 1 MiB O_DIRECT read in two: on the
/// benchmark VM, 1 MiB reads at QD8 reached the disk as 509 KiB on average,
/// and Strata read 0.85× as fast as qemu-nbd. Shorter transfers are not
/// split, but the kernel merges sequential ones up to the same limit, and
/// the disk there also does better with few segments per request: fio
/// 256 KiB O_DIRECT reads at QD64 ran at 719–848 MiB/s from 4 KiB pages and
/// 1720–1884 MiB/s from huge pages.
public enum TransferBuffers {
    /// Every buffer from `allocator` starts at this alignment.
    public static let alignment = 4096
    /// Transfers from this length up to `longestTransfer` get a chunk of a
    /// slab; shorter ones gain little and would waste most of a chunk.
    public static let minimumTransfer = 64 << 10
    public static let longestTransfer = 2 << 20

    /// ByteBuffers whose storage is a chunk of a huge-page slab when their
    /// capacity is in the slab range, a recycled buffer when it is at most
    /// `longestRecycled`, 4096-aligned memory otherwise.
    public static let allocator = ByteBufferAllocator(
        allocate: strata_huge_alloc, reallocate: strata_huge_realloc,
        deallocate: strata_huge_free, copy: strata_huge_copy)

    /// Whether a transfer of `length` bytes at memory `alignment` should
    /// use `allocator`. Buffered transfers gain too: a chunk stays mapped,
    /// where a fresh 256 KiB malloc is page-faulted in on every request.
    /// nbdcopy of a cached image (256 KiB requests) cost the server 29–78K
    /// page faults and 1.2–1.8 s of CPU that way, 180–190 faults and
    /// 1.0–1.1 s from chunks.
    public static func suits(length: Int, alignment: Int) -> Bool {
        pageAlignmentCovers(alignment) && length >= minimumTransfer && length <= longestTransfer
    }

    /// Longest buffer `allocator` recycles per size class rather than
    /// mallocing it afresh (see short_buffers.c): a 4 KiB read's buffer with
    /// its reply header's page is 8 KiB.
    public static let longestRecycled = Int(STRATA_SHORT_MAX_SIZE)

    /// Whether a buffer of `capacity` bytes at memory `alignment` is one
    /// `allocator` recycles.
    public static func recycles(capacity: Int, alignment: Int) -> Bool {
        pageAlignmentCovers(alignment) && capacity <= longestRecycled
    }

    /// Whether memory starting on a page meets `alignment`: any power of
    /// two up to a page.
    private static func pageAlignmentCovers(_ alignment: Int) -> Bool {
        alignment >= 1 && alignment <= Self.alignment && alignment & (alignment - 1) == 0
    }

    /// Whether a buffer's storage is a recycled short buffer.
    public static func isRecycled(_ buffer: ByteBuffer) -> Bool {
        buffer.withUnsafeReadableBytes { strata_short_room($0.baseAddress) } != 0
    }

    /// Whether a buffer's storage is (a chunk of) a huge-page slab.
    public static func isSlab(_ buffer: ByteBuffer) -> Bool {
        buffer.withUnsafeReadableBytes { strata_huge_is_slab($0.baseAddress) } != 0
    }
}
