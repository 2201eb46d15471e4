import BlockLayer
import NIOCore
import NIOEmbedded
#if canImport(Glibc)
import Glibc
#endif
@testable import QCOW2
import Testing

/// An image file in memory that records what the qcow2 driver asks of it.
final class RecordingFile: BlockDriver {
    let formatName = "file"
    var bytes: [UInt8]
    private(set) var reads: [(offset: Int64, count: Int)] = []
    private(set) var writes: [(offset: Int64, count: Int)] = []

    /// When set, every range the file holds counts as cached, offered as a
    /// region of this handle (so a test can tell which file a range came from).
    var cachedHandle: NIOFileHandle?

    /// When set, reads wait here with their data unread until the test
    /// runs them: reads in flight at the disk.
    var heldReads: [() -> Void]?
    /// Ranges punched out (discarded), in order; when `heldDiscards` is
    /// set, a discard waits there until the test runs it.
    private(set) var discards: [(offset: Int64, count: Int64)] = []
    var heldDiscards: [() -> Void]?

    init(bytes: [UInt8]) { self.bytes = bytes }
    /// The request alignment the file states (4096 as a 4 KiB-sector disk
    /// under O_DIRECT).
    var requestAlignment = 1
    func refreshLimits(_ limits: inout BlockLimits) { limits.requestAlignment = max(limits.requestAlignment, requestAlignment) }

    /// A new image as `QCOW2ImageBuilder` lays it out.
    convenience init(image options: QCOW2ImageBuilder.Options) throws {
        let layout = try QCOW2ImageBuilder(options: options).build()
        var bytes = [UInt8](repeating: 0, count: Int(layout.fileLength))
        for (offset, data) in layout.writes { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
        self.init(bytes: bytes)
    }

    /// When set, the length the file claims: past `bytes` it reads as zeros,
    /// as a sparse file does.
    var apparentLength: Int64?

    var length: Int64 { apparentLength ?? Int64(bytes.count) }

    func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        guard let handle = cachedHandle, offset + Int64(length) <= self.length else { return nil }
        return CachedFileExtent(file: handle, offset: offset, length: length)
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer, flags: BlockRequestFlags,
              completion: @escaping BlockCompletion) {
        if let error = readFault?(offset, buffer.count) { return completion(error) }
        reads.append((offset, buffer.count))
        let perform = {
            let start = Int(offset)
            let available = max(0, min(buffer.count, self.bytes.count - start))
            buffer.initializeMemory(as: UInt8.self, repeating: 0)
            if available > 0 {
                self.bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + start, byteCount: available) }
            }
            completion(nil)
        }
        if heldReads != nil { heldReads!.append(perform) } else { perform() }
    }

    /// When set, writes that would reach past it fail with ENOSPC: a full disk.
    var writeLimit: Int64?
    /// When set, writes wait here, unwritten, until the test runs them (in
    /// any order: writes in flight at the disk).
    var heldWrites: [() -> Void]?

    /// When set, the error (or nil) each write gets before it lands: a
    /// disk failing chosen writes.
    var writeFault: ((_ offset: Int64, _ count: Int) -> BlockError?)?
    /// The same for reads.
    var readFault: ((_ offset: Int64, _ count: Int) -> BlockError?)?

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags,
               completion: @escaping BlockCompletion) {
        if let error = writeFault?(offset, buffer.count) { return completion(error) }
        if let writeLimit, offset + Int64(buffer.count) > writeLimit {
            return completion(BlockError(errno: ENOSPC, "No space left on device"))
        }
        // The caller keeps its buffer until the completion: a held write
        // copies it when it runs.
        let perform = {
            self.log?("write \(offset)")
            self.writes.append((offset, buffer.count))
            let end = Int(offset) + buffer.count
            if end > self.bytes.count { self.bytes += [UInt8](repeating: 0, count: end - self.bytes.count) }
            self.bytes.replaceSubrange(Int(offset)..<end, with: buffer)
            completion(nil)
        }
        if heldWrites != nil { heldWrites!.append(perform) } else { perform() }
    }

    /// When set, told of each write ("write OFFSET") and flush ("flush")
    /// as it lands: one log for several files shows their order.
    var log: ((String) -> Void)?

    func flush(completion: @escaping BlockCompletion) {
        log?("flush")
        completion(nil)
    }

    func discard(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        let perform = {
            self.discards.append((offset, length))
            let end = min(Int(offset + length), self.bytes.count)
            if Int(offset) < end { self.bytes.replaceSubrange(Int(offset)..<end, with: repeatElement(0, count: end - Int(offset))) }
            completion(nil)
        }
        if heldDiscards != nil { heldDiscards!.append(perform) } else { perform() }
    }

    func forget() {
        reads = []
        writes = []
    }
}

/// The metadata caches: once warm, allocated reads and in-place writes
/// cost the image file exactly one data request each, no metadata I/O.
@Suite struct QCOW2MetadataCacheTests {
    let loop = EmbeddedEventLoop()
    /// Nodes and backends refer to their graph without owning it.
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()

    func open(_ file: RecordingFile, readOnly: Bool, l2CacheSize: Int? = nil) throws -> BlockBackend {
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: readOnly, l2CacheSize: l2CacheSize))
        loop.run()
        let node = try graph.addNode(name: "image", driver: try future.wait(), options: BlockNodeOptions(readOnly: readOnly),
                                     children: [.init(name: "file", role: .image, node: fileNode)])
        let perm: BlockPermission = readOnly ? .consistentRead : [.consistentRead, .write]
        return try graph.attachBackend(name: "test", to: node, perm: perm, shared: .all)
    }

    /// An image with every cluster allocated (metadata preallocated).
    func preallocatedImage(size: UInt64 = 64 << 20, clusterBits: UInt32 = 16) throws -> RecordingFile {
        var options = QCOW2ImageBuilder.Options(size: size)
        options.clusterBits = clusterBits
        options.preallocateMetadata = true
        return try RecordingFile(image: options)
    }

    /// One request of `count` bytes every `step` bytes over `size`.
    func pass(_ backend: BlockBackend, write: Bool, size: Int = 64 << 20, step: Int = 1 << 20, count: Int = 4096) {
        var buffer = [UInt8](repeating: 0x5a, count: count)
        var failures = 0
        for offset in stride(from: 0, to: size, by: step) {
            buffer.withUnsafeMutableBytes { bytes in
                let done: BlockCompletion = { if $0 != nil { failures += 1 } }
                if write {
                    backend.write(at: Int64(offset), from: UnsafeRawBufferPointer(bytes), completion: done)
                } else {
                    backend.read(at: Int64(offset), into: bytes, completion: done)
                }
            }
            loop.run()
        }
        #expect(failures == 0)
    }

    /// Reads (read-only) and in-place writes (read-write): the second pass
    /// costs one file request of the same kind per guest request, and no
    /// other request.
    @Test(arguments: [false, true])
    func warmRequestsTouchOnlyData(write: Bool) throws {
        let file = try preallocatedImage()
        let backend = try open(file, readOnly: !write)
        pass(backend, write: write)
        file.forget()
        pass(backend, write: write)
        let same = write ? file.writes : file.reads
        let other = write ? file.reads : file.writes
        #expect(same.count == 64, "one file request per guest request: \(same.count)")
        #expect(same.allSatisfy { $0.count == 4096 })
        #expect(other.isEmpty, "no metadata requests: \(other.count)")
    }

    /// A write over clusters that follow each other in the file is one
    /// file write, however many clusters it spans (as in QEMU); the bytes
    /// land where a read finds them.
    @Test func aWriteOverContiguousClustersIsOneFileWrite() throws {
        let file = try preallocatedImage()
        let backend = try open(file, readOnly: false)
        pass(backend, write: true, size: 4 << 20, step: 64 << 10)  // the tables are warm
        file.forget()
        let data = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        let offset: Int64 = (64 << 10) + 100  // 17 clusters, unaligned at both ends
        try write(backend, data, at: offset)
        #expect(file.writes.count == 1 && file.writes.first?.count == 1 << 20, "\(file.writes)")
        #expect(try read(backend, count: data.count, at: offset) == data)
    }

    /// Clusters allocated out of order are not contiguous in the file: the
    /// write goes cluster by cluster and still lands right.
    @Test func aWriteOverScatteredClustersGoesClusterByCluster() throws {
        var options = QCOW2ImageBuilder.Options(size: 4 << 20)
        options.clusterBits = 16
        let file = try RecordingFile(image: options)
        let backend = try open(file, readOnly: false)
        try write(backend, [1], at: 64 << 10)  // allocates guest cluster 1 first,
        try write(backend, [2], at: 0)         // then cluster 0 after it in the file
        file.forget()
        let data = (0..<(128 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        try write(backend, data, at: 0)
        #expect(file.writes.count == 2, "one write per cluster: \(file.writes)")
        #expect(try read(backend, count: data.count, at: 0) == data)
    }

    func write(_ backend: BlockBackend, _ data: [UInt8], at offset: Int64) throws {
        var failure: BlockError?
        data.withUnsafeBytes { backend.write(at: offset, from: $0) { failure = $0 } }
        loop.run()
        if let failure { throw failure }
    }

    func read(_ backend: BlockBackend, count: Int, at offset: Int64) throws -> [UInt8] {
        var result = [UInt8](repeating: 0, count: count)
        var failure: BlockError?
        result.withUnsafeMutableBytes { backend.read(at: offset, into: $0) { failure = $0 } }
        loop.run()
        if let failure { throw failure }
        return result
    }

    /// The control: 512-byte clusters (one table maps 32 KiB) and a cache
    /// of two tables, so a second pass has to read tables again.
    @Test func aSmallL2CacheReadsTablesAgain() throws {
        let file = try preallocatedImage(size: 4 << 20, clusterBits: 9)
        let backend = try open(file, readOnly: true, l2CacheSize: 1024)
        pass(backend, write: false, size: 4 << 20, step: 32 << 10, count: 512)
        file.forget()
        pass(backend, write: false, size: 4 << 20, step: 32 << 10, count: 512)
        #expect(file.reads.count == 2 * 128, "a table read and a data read per guest read: \(file.reads.count)")
    }
}
