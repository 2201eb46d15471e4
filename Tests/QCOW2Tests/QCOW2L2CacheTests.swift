import BlockLayer
@testable import QCOW2
import Testing

@Suite struct QCOW2L2CacheTests {
    func table(at offset: UInt64) throws -> QCOW2L2Table {
        let buffer = try #require(AlignedBuffer.allocate(count: 512, alignment: 512))
        return QCOW2L2Table(offset: offset, buffer: buffer, entrySize: 8)
    }

    /// Full, it drops the least recently used table.
    @Test func evictsTheLeastRecentlyUsedTable() throws {
        let cache = QCOW2L2Cache(capacity: 2)
        let a = try table(at: 1 << 16), b = try table(at: 2 << 16), c = try table(at: 3 << 16), d = try table(at: 4 << 16)
        cache.insert(a)
        cache.insert(b)
        #expect(cache.get(a.offset) === a)
        cache.insert(c)
        #expect(cache.get(b.offset) == nil, "b was used least recently")
        #expect(cache.get(a.offset) === a && cache.get(c.offset) === c)
        _ = cache.get(a.offset)
        cache.insert(d)
        #expect(cache.get(c.offset) == nil, "c was used least recently")
        #expect(cache.get(a.offset) === a && cache.get(d.offset) === d && cache.count == 2)
        cache.remove(a.offset)
        #expect(cache.get(a.offset) == nil && cache.count == 1)
        #expect(cache.hits == 6 && cache.misses == 3)
    }
}
