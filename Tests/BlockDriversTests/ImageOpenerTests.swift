import BlockDrivers
import BlockLayer
import Foundation
import NIOCore
import NIOPosix
import QCOW2
import Testing

@Suite struct ImageOpenerTests {
    /// Backing and data file names resolve as qemu-img prints them in
    /// `full-backing-filename` (checked by hand for an image in `/`).
    @Test(arguments: [
        ("base.qcow2", "/", "/base.qcow2"),
        ("base.qcow2", "/images", "/images/base.qcow2"),
        ("../base.qcow2", "/images/vm", "/images/vm/../base.qcow2"),
        ("/other/base.qcow2", "/images", "/other/base.qcow2"),
        ("base.qcow2", "", "base.qcow2"),
    ])
    func relativeNamesResolveAgainstTheImagesDirectory(name: String, directory: String, expected: String) {
        #expect(ImageOpener.resolve(name, relativeTo: directory) == expected)
    }

    /// An image's directory, which its relative backing name resolves
    /// against: what Foundation's `deletingLastPathComponent` gave where
    /// the tool used it (checked against it on this toolchain), except
    /// that a bare name gives "" (Foundation traps) and "//" gives "/"
    /// (Foundation gives ""). A "/" before a combining mark still counts.
    @Test(arguments: [
        ("", ""), ("a", ""), ("dir/", ""), ("/a", "/"), ("/", "/"), ("//", "/"), ("//a", "/"),
        ("a/b", "a"), ("/a/b/", "/a"), ("a//b", "a"), ("a/b//", "a"), ("./o.qcow2", "."),
        ("../x/y.qcow2", "../x"), ("/images/vm/overlay.qcow2", "/images/vm"),
        ("d\u{e9}/\u{301}x.qcow2", "d\u{e9}"),
    ])
    func anImagesDirectoryIsItsNameWithoutTheLastComponent(path: String, expected: String) {
        #expect(ImageOpener.directory(of: path) == expected)
    }

    /// `img info` opens a qcow2 whose external data file is missing, as
    /// qemu-img info does; its data clusters must then fail to read, not be
    /// read from the image file in the data file's place.
    @Test func aMissingDataFileFailsDataReadsWhereOnlyMetadataWasWanted() throws {
        let directory = "/var/tmp/strata-opener-\(UUID().uuidString.prefix(8))"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var options = QCOW2ImageBuilder.Options(size: 1 << 20)
        options.dataFile = "\(directory)/missing.raw"
        options.dataFileRaw = true
        options.preallocateMetadata = true   // every cluster maps into the data file
        let layout = try QCOW2ImageBuilder(options: options).build()
        var bytes = [UInt8](repeating: 0x5a, count: Int(layout.fileLength))
        for (offset, data) in layout.writes { bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
        let image = "\(directory)/image.qcow2"
        try Data(bytes).write(to: URL(fileURLWithPath: image))

        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        defer {
            try? pool.syncShutdownGracefully()
            try? group.syncShutdownGracefully()
        }
        let loop = group.next()
        let (graph, io) = try loop.submit {
            (BlockGraph(eventLoop: loop), FileIOContext(eventLoop: loop, threadPool: pool))
        }.wait()
        var imageOptions = ImageOptions(filename: image, format: "qcow2")
        imageOptions.readOnly = true

        #expect(throws: BlockError.self, "a plain open needs the data file") {
            try loop.flatSubmit { ImageOpener.open(imageOptions, graph: graph, io: io) }.wait()
        }

        imageOptions.metadataOnly = true
        let node = try loop.flatSubmit { ImageOpener.open(imageOptions, graph: graph, io: io) }.wait()
        let readError = try loop.flatSubmit { () -> EventLoopFuture<BlockError?> in
            let promise = loop.makePromise(of: BlockError?.self)
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            node.read(at: 0, into: buffer) { error in
                buffer.deallocate()
                promise.succeed(error)
            }
            return promise.futureResult
        }.wait()
        #expect(readError?.errno == ENOENT)
        try loop.flatSubmit { () -> EventLoopFuture<Void> in
            graph.closeAll()
            return io.shutdown()
        }.wait()
    }
}
