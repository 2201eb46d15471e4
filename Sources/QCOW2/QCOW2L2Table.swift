import BlockLayer

/// One L2 table in memory: the on-disk bytes (big-endian), kept aligned so
/// they can be written back with O_DIRECT.
public final class QCOW2L2Table {
    public let offset: UInt64
    let buffer: AlignedBuffer
    let entrySize: Int
    var lastUse: UInt64 = 0
    /// Set while an update is being written back.
    var dirty = false

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

/// An LRU cache of L2 tables (QEMU's l2-cache-size), so that once warm,
/// reads and writes of allocated clusters do no metadata I/O.
public final class QCOW2L2Cache {
    public let capacity: Int
    private var tables: [UInt64: QCOW2L2Table] = [:]
    private var clock: UInt64 = 0
    public private(set) var hits = 0
    public private(set) var misses = 0

    public init(capacity: Int) {
        self.capacity = max(capacity, 2)
    }

    public func get(_ offset: UInt64) -> QCOW2L2Table? {
        guard let table = tables[offset] else {
            misses += 1
            return nil
        }
        hits += 1
        clock &+= 1
        table.lastUse = clock
        return table
    }

    public func insert(_ table: QCOW2L2Table) {
        clock &+= 1
        table.lastUse = clock
        tables[table.offset] = table
        if tables.count > capacity {
            // Evict the least recently used table that is not being written.
            if let victim = tables.values.filter({ !$0.dirty && $0 !== table }).min(by: { $0.lastUse < $1.lastUse }) {
                tables[victim.offset] = nil
            }
        }
    }

    public func remove(_ offset: UInt64) {
        tables[offset] = nil
    }

    public var count: Int { tables.count }
}
