import BlockLayer
import NIOCore
import NIOEmbedded
@testable import QCOW2
import Testing

/// An image whose data lives in an external data file: a flush syncs the
/// data file before any L2 table that maps its new clusters is written, so
/// after a crash no table points at data that never reached the disk.
@Suite struct QCOW2DataFileOrderTests {
    let loop = EmbeddedEventLoop()
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()
    final class Events { var all: [String] = [] }

    @Test func theDataFileIsSyncedBeforeTheTablesThatMapIt() throws {
        var options = QCOW2ImageBuilder.Options(size: 16 << 20)
        options.dataFile = "data.img"
        let image = try RecordingFile(image: options)
        let data = RecordingFile(bytes: [UInt8](repeating: 0, count: 16 << 20))
        let events = Events()
        image.log = { events.all.append("image \($0)") }
        data.log = { events.all.append("data \($0)") }

        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: image)
        let dataNode = try graph.addNode(name: "data", driver: data)
        let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: false))
        loop.run()
        let driver = try future.wait()
        let node = try graph.addNode(name: "image", driver: driver, options: BlockNodeOptions(readOnly: false),
                                     children: [.init(name: "file", role: .image, node: fileNode),
                                                .init(name: "data-file", role: [.data], node: dataNode)])
        let backend = try graph.attachBackend(name: "test", to: node, perm: [.consistentRead, .write], shared: .all)

        var written: BlockError??
        let bytes = [UInt8](repeating: 0x5a, count: 4096)
        bytes.withUnsafeBytes { backend.write(at: 1 << 20, from: $0) { written = .some($0) } }
        loop.run()
        #expect(written == .some(nil))
        #expect(events.all.contains { $0.hasPrefix("data write") }, "\(events.all)")
        var flushed: BlockError??
        backend.flush { flushed = .some($0) }
        loop.run()
        #expect(flushed == .some(nil))

        let l2 = Int64(driver.l1[0] & 0x00ff_ffff_ffff_fe00)
        #expect(l2 != 0)
        let dataSynced = try #require(events.all.firstIndex(of: "data flush"), "\(events.all)")
        let tableWritten = try #require(events.all.firstIndex(of: "image write \(l2)"), "\(events.all)")
        #expect(dataSynced < tableWritten, "\(events.all)")
    }
}
