import BlockLayer
import Glibc
import NIOCore
import NIOEmbedded
@testable import QCOW2
import Testing

/// Which ranges of a qcow2 overlay go out with `sendfile`, and from which
/// file: its own data clusters from the image file, what it leaves
/// unallocated from the backing file, nothing else.
@Suite struct QCOW2CachedExtentTests {
    let loop = EmbeddedEventLoop()

    struct Chain {
        var graph: BlockGraph
        var backend: BlockBackend
        var overlay: RecordingFile
        var base: RecordingFile

        func close() {
            try? overlay.cachedHandle?.close()
            try? base.cachedHandle?.close()
        }
    }

    /// A file in memory whose every range counts as cached.
    func cachedFile(_ bytes: [UInt8]) -> RecordingFile {
        let file = RecordingFile(bytes: bytes)
        file.cachedHandle = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: open("/dev/zero", O_RDONLY | O_CLOEXEC))
        return file
    }

    /// A 4 MiB qcow2 overlay over a raw base of `baseSize` bytes.
    func chain(baseSize: Int) throws -> Chain {
        var options = QCOW2ImageBuilder.Options(size: 4 << 20)
        options.backingFile = "base.raw"
        options.backingFormat = "raw"
        let layout = try QCOW2ImageBuilder(options: options).build()
        var bytes = [UInt8](repeating: 0, count: Int(layout.fileLength))
        for (offset, data) in layout.writes { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
        let overlay = cachedFile(bytes)
        let base = cachedFile([UInt8](repeating: 0xb5, count: baseSize))

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
        chain.backend.endCachedRead(extent)
        return (try! extent.file.withUnsafeFileDescriptor { $0 }, extent.offset)
    }

    func fd(_ file: RecordingFile) -> CInt { try! file.cachedHandle!.withUnsafeFileDescriptor { $0 } }

    func run(_ body: (@escaping BlockCompletion) -> Void) throws {
        var result: BlockError??
        body { result = .some($0) }
        loop.run()
        let error = try #require(result, "the request did not complete")
        if let error { throw error }
    }

    @Test func ownDataComesFromTheImageAndUnallocatedRangesFromTheBackingFile() throws {
        let chain = try chain(baseSize: 4 << 20)
        defer { chain.close() }
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
        defer { chain.close() }
        try run { chain.backend.writeZeroes(at: 1 << 20, length: 64 << 10, flags: [], completion: $0) }
        #expect(extent(chain, 1 << 20, 64 << 10) == nil)
        #expect(extent(chain, (2 << 20) - (64 << 10), 64 << 10) != nil)
        #expect(extent(chain, (2 << 20) - (64 << 10), 128 << 10) == nil, "zeroes past the base's end")
        #expect(extent(chain, 3 << 20, 64 << 10) == nil)
    }

    /// Reads within one run go straight to the image file or the backing
    /// file, past the general path; both must read the same. The base ends
    /// at 2 MiB: a read that crosses its end, or lies past it, is the
    /// general path's, with zeroes past the end.
    @Test func readsOfOneRunReadWhatTheGeneralPathReads() throws {
        let chain = try chain(baseSize: 2 << 20)
        defer { chain.close() }
        let data = [UInt8](repeating: 0x11, count: 64 << 10)
        try data.withUnsafeBytes { bytes in try run { chain.backend.write(at: 0, from: bytes, completion: $0) } }
        try run { chain.backend.writeZeroes(at: 1 << 20, length: 64 << 10, flags: [], completion: $0) }
        let base: UInt8 = 0xb5
        let cases: [(offset: Int64, length: Int, expected: [UInt8])] = [
            (4096, 4096, .init(repeating: 0x11, count: 4096)),  // own data
            (64 << 10, 4096, .init(repeating: base, count: 4096)),  // unallocated, one cluster
            ((64 << 10) + 512, 192 << 10, .init(repeating: base, count: 192 << 10)),  // unallocated, several clusters
            ((1 << 20) + 4096, 4096, .init(repeating: 0, count: 4096)),  // zero cluster
            ((2 << 20) - 4096, 4096, .init(repeating: base, count: 4096)),  // the base's last bytes
            ((2 << 20) - 2048, 4096, .init(repeating: base, count: 2048) + .init(repeating: 0, count: 2048)),
            (3 << 20, 4096, .init(repeating: 0, count: 4096)),  // past the base
            ((64 << 10) - 2048, 4096, .init(repeating: 0x11, count: 2048) + .init(repeating: base, count: 2048)),
        ]
        for (offset, length, expected) in cases {
            var read = [UInt8](repeating: 0xee, count: length)
            try read.withUnsafeMutableBytes { buffer in
                try run { chain.backend.read(at: offset, into: buffer, flags: [], completion: $0) }
            }
            #expect(read == expected, "read of \(length) at \(offset)")
        }
    }
}
