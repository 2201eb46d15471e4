import BlockLayer
import NIOCore
import NIOEmbedded
@testable import QCOW2
import Testing

/// Header rewrites while the image is open go out one after another.
@Suite struct QCOW2HeaderRewriteTests {
    let loop = EmbeddedEventLoop()
    final class Graphs { var all: [BlockGraph] = [] }
    let graphs = Graphs()

    /// Two rewrites in flight at once could land in either order, and the
    /// older one last: marking the image corrupt while a grown refcount
    /// table was being named could put the old table back in the header,
    /// after which its clusters were freed.
    @Test func aLaterHeaderRewriteIsNotOvertakenByAnEarlierOne() throws {
        let file = try RecordingFile(image: .init(size: 64 << 20))
        let graph = BlockGraph(eventLoop: loop)
        graphs.all.append(graph)
        let fileNode = try graph.addNode(name: "file", driver: file)
        let opened = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: false))
        loop.run()
        let driver = try opened.wait()

        file.heldWrites = []
        let first = driver.rewriteHeader(file: fileNode)
        driver.header.incompatibleFeatures.insert(.corrupt)
        let second = driver.rewriteHeader(file: fileNode)
        #expect(file.heldWrites?.count == 1, "the second waits for the first")
        // The disk takes whatever is in flight newest first.
        while let write = file.heldWrites?.popLast() {
            write()
            loop.run()
        }
        try first.wait()
        try second.wait()
        #expect(try QCOW2Header.parse(file.bytes).incompatibleFeatures.contains(.corrupt))
    }
}
