#if canImport(Glibc)
import Glibc
#endif

/// Memory aligned for O_DIRECT, owned by whoever allocated it.
///
/// Used for bounce buffers on the padding path and by drivers; the hot path
/// reads straight into the caller's memory and needs none.
public struct AlignedBuffer {
    public let pointer: UnsafeMutableRawPointer
    /// Bytes in use.
    public let count: Int
    /// Bytes allocated (at least `count`).
    public let capacity: Int

    public init(pointer: UnsafeMutableRawPointer, count: Int, capacity: Int) {
        self.pointer = pointer
        self.count = count
        self.capacity = capacity
    }

    /// Allocates `count` bytes at `alignment` (a power of two); nil if the
    /// allocation fails.
    public static func allocate(count: Int, alignment: Int) -> AlignedBuffer? {
        var memory: UnsafeMutableRawPointer?
        let align = max(alignment, MemoryLayout<UnsafeRawPointer>.size)
        guard posix_memalign(&memory, align, max(count, 1)) == 0, let memory else { return nil }
        return AlignedBuffer(pointer: memory, count: count, capacity: count)
    }

    /// As `allocate`, filled with zeroes.
    public static func zeroed(count: Int, alignment: Int) -> AlignedBuffer? {
        guard let buffer = allocate(count: count, alignment: alignment) else { return nil }
        memset(buffer.pointer, 0, count)
        return buffer
    }

    public var mutableBytes: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: pointer, count: count)
    }

    public var bytes: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: pointer, count: count)
    }

    public func deallocate() {
        free(pointer)
    }
}

/// True if every byte is zero. Word-at-a-time, stopping at the first
/// non-zero byte, which in real data comes at once.
@inlinable
public func isAllZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
    guard let base = buffer.baseAddress else { return true }
    let count = buffer.count
    var index = 0
    let misalignment = Int(bitPattern: base) & 7
    if misalignment != 0 {
        let head = min(8 - misalignment, count)
        while index < head {
            if base.load(fromByteOffset: index, as: UInt8.self) != 0 { return false }
            index += 1
        }
    }
    while index + 32 <= count {
        let a = base.load(fromByteOffset: index, as: UInt64.self)
        let b = base.load(fromByteOffset: index + 8, as: UInt64.self)
        let c = base.load(fromByteOffset: index + 16, as: UInt64.self)
        let d = base.load(fromByteOffset: index + 24, as: UInt64.self)
        if (a | b | c | d) != 0 { return false }
        index += 32
    }
    while index < count {
        if base.load(fromByteOffset: index, as: UInt8.self) != 0 { return false }
        index += 1
    }
    return true
}

@inlinable
func alignDown(_ value: Int64, _ alignment: Int) -> Int64 {
    value - value % Int64(alignment)
}

@inlinable
func alignUp(_ value: Int64, _ alignment: Int) -> Int64 {
    let remainder = value % Int64(alignment)
    return remainder == 0 ? value : value + Int64(alignment) - remainder
}
