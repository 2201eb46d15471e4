/// Reuses aligned buffers for bounces (O_DIRECT writes from unaligned
/// network buffers, padding), so the request path does not call
/// posix_memalign and free per request. Loop-confined, one per graph.
public final class AlignedBufferPool {
    /// Every pooled buffer is aligned to this, enough for any O_DIRECT device.
    public static let alignment = 4096
    /// Buffers up to this size are kept; larger ones are allocated each time.
    static let largestPooled = 1 << 20
    /// Buffers kept per size class.
    static let keptPerClass = 64

    /// Free buffers by size class (log2 of the size, from 12).
    private var free: [[AlignedBuffer]]
    /// Buffers handed out so far: a path meant to need no bounce can be
    /// checked to take none.
    public private(set) var taken = 0

    public init() {
        free = Array(repeating: [], count: Self.largestPooled.trailingZeroBitCount - 11)
    }

    private static func sizeClass(_ count: Int) -> (index: Int, size: Int)? {
        guard count <= largestPooled else { return nil }
        let size = max(4096, 1 << (Int.bitWidth - (max(count, 1) - 1).leadingZeroBitCount))
        return (size.trailingZeroBitCount - 12, size)
    }

    /// A buffer of at least `count` bytes; its `count` is `count`.
    public func take(count: Int, alignment: Int) -> AlignedBuffer? {
        taken += 1
        guard alignment <= Self.alignment, let (index, size) = Self.sizeClass(count) else {
            return AlignedBuffer.allocate(count: count, alignment: max(alignment, Self.alignment))
        }
        if let buffer = free[index].popLast() {
            return AlignedBuffer(pointer: buffer.pointer, count: count, capacity: size)
        }
        guard let fresh = AlignedBuffer.allocate(count: size, alignment: Self.alignment) else { return nil }
        return AlignedBuffer(pointer: fresh.pointer, count: count, capacity: size)
    }

    /// As `take`, filled with zeroes.
    public func takeZeroed(count: Int, alignment: Int) -> AlignedBuffer? {
        guard let buffer = take(count: count, alignment: alignment) else { return nil }
        buffer.pointer.initializeMemory(as: UInt8.self, repeating: 0, count: count)
        return buffer
    }

    /// Returns a buffer from `take`; it may be kept for reuse or freed.
    /// Only whole size classes are kept (every buffer here is at least
    /// 4096-aligned, so any of them serves any request of its class).
    public func give(_ buffer: AlignedBuffer) {
        guard let (index, size) = Self.sizeClass(buffer.capacity), size == buffer.capacity,
              free[index].count < Self.keptPerClass else {
            buffer.deallocate()
            return
        }
        free[index].append(buffer)
    }

    deinit {
        for list in free { list.forEach { $0.deallocate() } }
    }
}
