import BlockLayer

/// One L2 table in memory: the on-disk bytes (big-endian), kept aligned so
/// they can be written back with O_DIRECT.
public final class QCOW2L2Table {
    public let offset: UInt64
    let buffer: AlignedBuffer
    let entrySize: Int
    var lastUse: UInt64 = 0

    init(offset: UInt64, buffer: AlignedBuffer, entrySize: Int) {
        self.offset = offset
        self.buffer = buffer
        self.entrySize = entrySize
    }

    public var count: Int { buffer.count / entrySize }

    public func entry(_ index: Int) -> UInt64 {
        UInt64(bigEndian: buffer.pointer.loadUnaligned(fromByteOffset: index * entrySize, as: UInt64.self))
    }

    /// The subcluster bitmap of an extended L2 entry.
    public func bitmap(_ index: Int) -> UInt64 {
        UInt64(bigEndian: buffer.pointer.loadUnaligned(fromByteOffset: index * entrySize + 8, as: UInt64.self))
    }

    func setEntry(_ index: Int, _ value: UInt64) {
        buffer.pointer.storeBytes(of: value.bigEndian, toByteOffset: index * entrySize, as: UInt64.self)
    }

    func setBitmap(_ index: Int, _ value: UInt64) {
        buffer.pointer.storeBytes(of: value.bigEndian, toByteOffset: index * entrySize + 8, as: UInt64.self)
    }

    deinit {
        buffer.deallocate()
    }
}
