import BlockLayer
import Glibc
import NIOCore
import NIOEmbedded
@testable import QCOW2
import Testing

/// A file in memory whose every range counts as cached: it offers any
/// range it holds, as a region of its own descriptor, so a test can tell
/// which file the qcow2 driver sent a range to.
final class WhollyCachedFile: BlockDriver {
    let formatName = "file"
    var bytes: [UInt8]
    let handle: NIOFileHandle

    init(bytes: [UInt8]) {
        self.bytes = bytes
        handle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: open("/dev/zero", O_RDONLY | O_CLOEXEC))
    }

    var length: Int64 { Int64(bytes.count) }

    func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        offset + Int64(length) <= self.length ? CachedFileExtent(file: handle, offset: offset, length: length) : nil
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer, flags: BlockRequestFlags,
              completion: @escaping BlockCompletion) {
        let start = Int(offset)
        let available = max(0, min(buffer.count, bytes.count - start))
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        if available > 0 {
            bytes.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + start, byteCount: available) }
        }
        completion(nil)
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags,
               completion: @escaping BlockCompletion) {
        let end = Int(offset) + buffer.count
        if end > bytes.count { bytes += [UInt8](repeating: 0, count: end - bytes.count) }
        bytes.replaceSubrange(Int(offset)..<end, with: buffer)
        completion(nil)
    }

    func flush(completion: @escaping BlockCompletion) { completion(nil) }

    func close() { try? handle.close() }
}

/// Which ranges of a qcow2 overlay go out with `sendfile`, and from which
/// file: its own data clusters from the image file, what it leaves
/// unallocated from the backing file, nothing else.
@Suite struct QCOW2CachedExtentTests {
    let loop = EmbeddedEventLoop()

    struct Chain {
        var graph: BlockGraph
        var backend: BlockBackend
        var overlay: WhollyCachedFile
        var base: WhollyCachedFile
    }

    /// A 4 MiB qcow2 overlay over a raw base of `baseSize` bytes.
    func chain(baseSize: Int) throws -> Chain {
        var options = QCOW2ImageBuilder.Options(size: 4 << 20)
        options.backingFile = "base.raw"
        options.backingFormat = "raw"
        let layout = try QCOW2ImageBuilder(options: options).build()
        var bytes = [UInt8](repeating: 0, count: Int(layout.fileLength))
        for (offset, data) in layout.writes { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
        let overlay = WhollyCachedFile(bytes: bytes)
        let base = WhollyCachedFile(bytes: [UInt8](repeating: 0xb5, count: baseSize))

        let graph = BlockGraph(eventLoop: loop)
        let baseNode = try graph.addNode(name: "base", driver: base, options: BlockNodeOptions(readOnly: true))
        let fileNode = try graph.addNode(name: "file", driver: overlay)
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: false))
        loop.run()
        let node = try graph.addNode(name: "image", driver: try future.wait(), children: [
            .init(name: "file", role: .image, node: fileNode),
            .init(name: "backing", role: .backing, node: baseNode),
        ])
        let backend = try graph.attachBackend(name: "test", to: node, perm: [.consistentRead, .write], shared: .all)
        return Chain(graph: graph, backend: backend, overlay: overlay, base: base)
    }

    func extent(_ chain: Chain, _ offset: Int64, _ length: Int) -> (file: CInt, offset: Int64)? {
        guard let extent = chain.backend.beginCachedRead(at: offset, length: length) else { return nil }
        chain.backend.endCachedRead()
        return (try! extent.file.withUnsafeFileDescriptor { $0 }, extent.offset)
    }

    func fd(_ file: WhollyCachedFile) -> CInt { try! file.handle.withUnsafeFileDescriptor { $0 } }

    func run(_ body: (@escaping BlockCompletion) -> Void) throws {
        var result: BlockError??
        body { result = .some($0) }
        loop.run()
        let error = try #require(result, "the request did not complete")
        if let error { throw error }
    }

    @Test func ownDataComesFromTheImageAndUnallocatedRangesFromTheBackingFile() throws {
        let chain = try chain(baseSize: 4 << 20)
        defer { chain.overlay.close(); chain.base.close() }
        let data = [UInt8](repeating: 0x11, count: 64 << 10)
        try data.withUnsafeBytes { bytes in try run { chain.backend.write(at: 0, from: bytes, completion: $0) } }

        let own = try #require(extent(chain, 0, 64 << 10))
        #expect(own.file == fd(chain.overlay))
        #expect(own.offset > 0 && own.offset % (64 << 10) == 0, "a cluster of the image file, after its metadata")
        #expect(Array(chain.overlay.bytes[Int(own.offset)..<Int(own.offset) + 4]) == [0x11, 0x11, 0x11, 0x11])

        let below = try #require(extent(chain, 1 << 20, 256 << 10))
        #expect(below.file == fd(chain.base) && below.offset == 1 << 20)
        // Partly the overlay's and partly the base's: read as usual.
        #expect(extent(chain, 0, 128 << 10) == nil)
    }

    @Test func zeroClustersAndRangesPastAShortBackingFileAreReadAsUsual() throws {
        let chain = try chain(baseSize: 2 << 20)
        defer { chain.overlay.close(); chain.base.close() }
        try run { chain.backend.writeZeroes(at: 1 << 20, length: 64 << 10, flags: [], completion: $0) }
        #expect(extent(chain, 1 << 20, 64 << 10) == nil)
        #expect(extent(chain, (2 << 20) - (64 << 10), 64 << 10) != nil)
        #expect(extent(chain, (2 << 20) - (64 << 10), 128 << 10) == nil, "zeroes past the base's end")
        #expect(extent(chain, 3 << 20, 64 << 10) == nil)
    }
}
