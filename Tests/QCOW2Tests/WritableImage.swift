import BlockLayer
import NIOEmbedded
@testable import QCOW2

/// Opens the qcow2 image in `file` writable: a file node and the image
/// node over it, in a graph handed to `keep` (nodes refer to their graph
/// without owning it, so a suite holds on to it).
func openWritableImage(_ file: RecordingFile, on loop: EmbeddedEventLoop,
                       keep: (BlockGraph) -> Void) throws -> (QCOW2Driver, BlockNode) {
    let graph = BlockGraph(eventLoop: loop)
    keep(graph)
    let fileNode = try graph.addNode(name: "file", driver: file)
    let future = QCOW2Driver.open(file: fileNode, options: QCOW2Options(readOnly: false))
    loop.run()
    let driver = try future.wait()
    let node = try graph.addNode(name: "image", driver: driver, options: BlockNodeOptions(readOnly: false),
                                 children: [.init(name: "file", role: .image, node: fileNode)])
    return (driver, node)
}
