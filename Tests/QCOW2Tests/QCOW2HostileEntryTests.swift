import BlockLayer
import NIOCore
import NIOEmbedded
@testable import QCOW2
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// L2 entries of a corrupt image that name metadata or free clusters:
/// writes refuse them and mark the image corrupt, and a discard never frees
/// metadata for the allocator to hand out as data.
@Suite struct QCOW2HostileEntryTests {
    let loop = EmbeddedEventLoop()
    /// Nodes refer to their graph without owning it.
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()
    let clusterSize = 64 << 10

    /// A preallocated 4 MiB image, followed by one cluster no refcount
    /// counts, whose L2 entry for guest cluster 0 is replaced by
    /// `entry(header, offset of that free cluster)`.
    func image(entry: (QCOW2Header, UInt64) -> UInt64) throws -> (RecordingFile, QCOW2Header) {
        var options = QCOW2ImageBuilder.Options(size: 4 << 20)
        options.clusterBits = 16
        options.preallocateMetadata = true
        let layout = try QCOW2ImageBuilder(options: options).build()
        var bytes = [UInt8](repeating: 0, count: Int(layout.fileLength) + clusterSize)
        for (offset, data) in layout.writes { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
        let header = try QCOW2Header.parse(bytes)
        let l1Entry = bytes[Int(header.l1TableOffset)..<Int(header.l1TableOffset) + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let l2 = Int(l1Entry & QCOW2Entry.offsetMask)
        let value = entry(header, UInt64(layout.fileLength))
        for index in 0..<8 { bytes[l2 + index] = UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * index)) }
        return (RecordingFile(bytes: bytes), header)
    }

    func open(_ file: RecordingFile) throws -> QCOW2Driver {
        try openWritableImage(file, on: loop) { graphs.all.append($0) }.0
    }

    func run(_ body: (@escaping BlockCompletion) -> Void) -> BlockError? {
        var result: BlockError?
        var done = false
        body { result = $0; done = true }
        loop.run()
        #expect(done)
        return result
    }

    @Test func aDiscardOfAnEntryNamingMetadataDoesNotFreeIt() throws {
        let (file, header) = try image { header, _ in QCOW2Entry.copied | header.l1TableOffset }
        let driver = try open(file)
        let l1Cluster = Int64(header.l1TableOffset) / Int64(clusterSize)
        let before = driver.refcounter!.refcount(l1Cluster)
        #expect(run { driver.discard(at: 0, length: Int64(clusterSize), completion: $0) } == nil)
        #expect(run { driver.flush(completion: $0) } == nil)
        #expect(driver.refcounter!.refcount(l1Cluster) == before, "the L1 table's refcount is untouched")
        #expect(driver.refcounter!.metadataClusters.contains(l1Cluster))
        // The next allocation does not land on the L1 table.
        let data = [UInt8](repeating: 0x77, count: clusterSize)
        #expect(run { done in data.withUnsafeBytes { driver.write(at: Int64(clusterSize), from: $0, flags: [], completion: done) } } == nil)
        #expect(run { driver.flush(completion: $0) } == nil)
        #expect(Array(file.bytes[Int(header.l1TableOffset)..<Int(header.l1TableOffset) + 8]) != [UInt8](repeating: 0x77, count: 8))
    }

    /// 2,048 snapshots with L1 tables of 32 MiB, a million clusters
    /// between them (a hostile image may name 65,536; QEMU accepts them
    /// wherever they lie). The overlap checks hold them as runs, not an
    /// entry per cluster, and still refuse a write into one: here guest
    /// cluster 0's data cluster is also the first snapshot's L1 table.
    @Test func snapshotL1TablesAreHeldAsRunsAndStillChecked() throws {
        let (file, _) = try image { _, free in QCOW2Entry.copied | free }
        let free = UInt64(file.bytes.count - clusterSize)
        let far: UInt64 = 1 << 40
        var table: [UInt8] = []
        func append<T: FixedWidthInteger>(_ value: T) {
            withUnsafeBytes(of: value.bigEndian) { table += $0 }
        }
        for index in 0..<2048 {
            append(index == 0 ? free : far + UInt64(index) * (32 << 20))  // L1 table offset
            append(UInt32(index == 0 ? 1 : 4 << 20))  // L1 entries
            append(UInt16(1)); append(UInt16(1))  // id and name sizes
            append(UInt32(0)); append(UInt32(0)); append(UInt64(0)); append(UInt32(0))  // dates, VM state
            append(UInt32(0))  // no extra data
            table += [0x31, 0x73, 0, 0, 0, 0, 0, 0]  // id "1", name "s", padding to 8
        }
        let tableOffset = UInt64(file.bytes.count)
        file.bytes += table + [UInt8](repeating: 0, count: clusterSize - table.count % clusterSize)
        withUnsafeBytes(of: UInt32(2048).bigEndian) { file.bytes.replaceSubrange(60..<64, with: $0) }
        withUnsafeBytes(of: tableOffset.bigEndian) { file.bytes.replaceSubrange(64..<72, with: $0) }

        let driver = try open(file)
        #expect(driver.snapshots.count == 2048)
        let refcounter = try #require(driver.refcounter)
        #expect(refcounter.metadataClusters.count < 1000, "\(refcounter.metadataClusters.count) clusters held one by one")
        let inside = Int64(far + 100 * (32 << 20) + (5 << 20)) / Int64(clusterSize)
        #expect(refcounter.holdsMetadata(inside))
        #expect(!refcounter.holdsMetadata(Int64(far + 2048 * (32 << 20)) / Int64(clusterSize)))
        let data = [UInt8](repeating: 0x55, count: 4096)
        let error = run { done in data.withUnsafeBytes { driver.write(at: 0, from: $0, flags: [], completion: done) } }
        #expect(error?.errno == EIO, "the write into the snapshot's L1 table is refused")
        #expect(driver.corruptReason?.contains("metadata") == true, "\(driver.corruptReason ?? "not marked corrupt")")
    }

    @Test(arguments: ["metadata", "unaligned", "free"])
    func anInPlaceWriteToABadClusterMarksTheImageCorrupt(kind: String) throws {
        let (file, _) = try image { header, free in
            switch kind {
            case "metadata": return QCOW2Entry.copied | header.l1TableOffset
            case "unaligned": return QCOW2Entry.copied | (header.l1TableOffset + UInt64(4 * (64 << 10)) + 512)
            default: return QCOW2Entry.copied | free
            }
        }
        let driver = try open(file)
        let data = [UInt8](repeating: 0x55, count: 4096)
        let error = run { done in data.withUnsafeBytes { driver.write(at: 0, from: $0, flags: [], completion: done) } }
        #expect(error != nil, "the write is refused")
        #expect(driver.header.incompatibleFeatures.contains(.corrupt), "and the image is marked corrupt")
        // From then on nothing changes, anywhere; reads still work.
        let elsewhere = Int64(clusterSize)
        let later = run { done in data.withUnsafeBytes { driver.write(at: elsewhere, from: $0, flags: [], completion: done) } }
        #expect(later?.errno == EIO, "a later write to a sound cluster fails too")
        #expect(run { driver.writeZeroes(at: elsewhere, length: Int64(clusterSize), flags: [], completion: $0) }?.errno == EIO)
        #expect(run { driver.discard(at: elsewhere, length: Int64(clusterSize), completion: $0) }?.errno == EIO)
        var readBack = [UInt8](repeating: 1, count: 4096)
        #expect(run { done in readBack.withUnsafeMutableBytes { driver.read(at: elsewhere, into: $0, flags: [], completion: done) } } == nil)
    }

    /// A read that meets a cluster off the grid (data, or a preallocated
    /// zero cluster) fails and, the image being writable, marks it corrupt
    /// as QEMU does: nothing is written after. The read does not wait for
    /// the header write; a close does.
    @Test(arguments: [UInt64(0), QCOW2Entry.zeroFlag])
    func aReadOfAnUnalignedClusterMarksAWritableImageCorrupt(flags: UInt64) throws {
        let (file, _) = try image { header, _ in
            flags | QCOW2Entry.copied | (header.l1TableOffset + UInt64(4 * (64 << 10)) + 512)
        }
        let driver = try open(file)
        file.heldWrites = []
        var readBack = [UInt8](repeating: 1, count: 4096)
        let error = run { done in readBack.withUnsafeMutableBytes { driver.read(at: 0, into: $0, flags: [], completion: done) } }
        #expect(error?.errno == EIO, "the read fails")
        #expect(driver.corruptReason?.hasPrefix("Cluster allocation offset 0x") == true, "\(driver.corruptReason ?? "not marked corrupt")")
        #expect(file.heldWrites?.count == 1, "one header write, in flight")
        let data = [UInt8](repeating: 0x55, count: 4096)
        var later: BlockError?
        data.withUnsafeBytes { bytes in driver.write(at: Int64(clusterSize), from: bytes, flags: []) { later = $0 } }
        loop.run()
        #expect(later?.errno == EIO, "a later write to a sound cluster fails")

        // Through the node, which skips the driver when no write ended since
        // the last flush: the header write counts as one.
        var flushed = false
        driver.node!.flush { _ in flushed = true }
        var closed = false
        driver.prepareToClose { _ in closed = true }
        loop.run()
        #expect(!flushed, "a flush waits for the header write")
        #expect(!closed, "the close waits for the header write")
        while let write = file.heldWrites?.first {
            file.heldWrites!.removeFirst()
            write()
            loop.run()
        }
        #expect(flushed && closed)
        #expect(try QCOW2Header.parse(file.bytes).incompatibleFeatures.contains(.corrupt), "the header on disk says corrupt")
    }

    /// Reserved bits in an L2 entry are for `check` to report; QEMU reads
    /// such an entry as if they were clear, and so does Strata.
    @Test func aReadOfAnEntryWithReservedBitsGoesOn() throws {
        let (file, _) = try image { _, free in QCOW2Entry.copied | free | 1 << 1 | 1 << 56 }
        let free = file.bytes.count - clusterSize
        file.bytes.replaceSubrange(free..<free + 4096, with: repeatElement(0x5a, count: 4096))
        let driver = try open(file)
        var readBack = [UInt8](repeating: 1, count: 4096)
        #expect(run { done in readBack.withUnsafeMutableBytes { driver.read(at: 0, into: $0, flags: [], completion: done) } } == nil)
        #expect(readBack == [UInt8](repeating: 0x5a, count: 4096))
        #expect(driver.corruptReason == nil)
    }
}
