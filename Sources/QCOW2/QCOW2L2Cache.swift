/// An LRU cache of L2 tables (QEMU's l2-cache-size), so that once warm,
/// reads and writes of allocated clusters do no metadata I/O.
public final class QCOW2L2Cache {
    public let capacity: Int
    /// Tables by their offset in the image file.
    private var tables = QCOW2ClusterMap<QCOW2L2Table>()
    private var clock: UInt64 = 0
    public private(set) var hits = 0
    public private(set) var misses = 0

    public init(capacity: Int) {
        self.capacity = max(capacity, 2)
    }

    public func get(_ offset: UInt64) -> QCOW2L2Table? {
        guard let table = tables[Int64(offset)] else {
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
        tables[Int64(table.offset)] = table
        if tables.count > capacity {
            // Evict the least recently used table. One being changed or
            // written back stays reachable: the driver pins it (`pinnedL2`).
            if let victim = tables.elements.lazy.map(\.value).filter({ $0 !== table })
                .min(by: { $0.lastUse < $1.lastUse }) {
                tables[Int64(victim.offset)] = nil
            }
        }
    }

    public func remove(_ offset: UInt64) {
        tables[Int64(offset)] = nil
    }

    public var count: Int { tables.count }
}
