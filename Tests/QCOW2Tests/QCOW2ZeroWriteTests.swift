import BlockLayer
import NIOEmbedded
@testable import QCOW2
import Testing

/// Zero writes off the subcluster grid where the file's request alignment
/// (4 KiB sectors under O_DIRECT) is larger than a subcluster (2 KiB): the
/// node hands the qcow2 driver a piece over two subclusters, which become
/// zero in the table when they hold no data, as QEMU (whose qcow2 keeps a
/// request alignment of 1) makes them; otherwise zeroes are written.
@Suite struct QCOW2ZeroWriteTests {
    let loop = EmbeddedEventLoop()
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()

    /// An empty 4 MiB image with extended L2 and 64 KiB clusters over a
    /// file that wants 4 KiB-aligned requests.
    func open() throws -> (QCOW2Driver, BlockNode) {
        var options = QCOW2ImageBuilder.Options(size: 4 << 20)
        options.clusterBits = 16
        options.extendedL2 = true
        let file = try RecordingFile(image: options)
        file.requestAlignment = 4096
        return try openWritableImage(file, on: loop) { graphs.all.append($0) }
    }

    func run(_ body: (@escaping BlockCompletion) -> Void) -> BlockError?? {
        var result: BlockError??
        body { result = .some($0) }
        loop.run()
        return result
    }

    func status(_ driver: QCOW2Driver, at offset: Int64, length: Int64) -> BlockStatus? {
        var status: BlockStatus?
        driver.blockStatus(at: offset, length: length) { status = try? $0.get() }
        loop.run()
        return status
    }

    @Test func aPieceOverTwoEmptySubclustersMakesThemZero() throws {
        let (driver, node) = try open()
        #expect(node.limits.requestAlignment == 4096)
        // [1 KiB, 4 KiB): the tail of subcluster 0 and all of subcluster 1.
        #expect(run { node.writeZeroes(at: 1024, length: 3072, flags: [.noFallback], completion: $0) } == .some(nil))
        let zeroed = status(driver, at: 0, length: 65536)
        #expect(zeroed?.flags == [.zero, .allocated])
        #expect(zeroed?.length == 4096)
        #expect(status(driver, at: 4096, length: 65536)?.flags == [])
    }

    @Test func aPieceOverASubclusterWithDataIsWrittenAsZeroes() throws {
        let (driver, node) = try open()
        let data = [UInt8](repeating: 0x5a, count: 4096)
        #expect(run { done in data.withUnsafeBytes { node.write(at: 0, from: $0, flags: [], completion: done) } } == .some(nil))
        #expect(run { node.writeZeroes(at: 1024, length: 3072, flags: [.noFallback], completion: $0) } == .some(.enotsup))
        #expect(run { node.writeZeroes(at: 1024, length: 3072, flags: [], completion: $0) } == .some(nil))
        #expect(status(driver, at: 0, length: 4096)?.flags.contains(.data) == true)
        var back = [UInt8](repeating: 1, count: 4096)
        #expect(run { done in back.withUnsafeMutableBytes { node.read(at: 0, into: $0, completion: done) } } == .some(nil))
        #expect(back == [UInt8](repeating: 0x5a, count: 1024) + [UInt8](repeating: 0, count: 3072))
    }
}
