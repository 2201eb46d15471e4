@testable import BlockDrivers
import BlockLayer
import Glibc
import NIOCore
import Testing

/// Which reads the file driver offers for `sendfile` (`CachedFileExtent`).
extension FileDriverTests {
    func cachedExtent(_ node: BlockNode, _ offset: Int64, _ length: Int) throws -> (offset: Int64, length: Int)? {
        try loop.submit { node.cachedFileExtent(at: offset, length: length).map { ($0.offset, $0.length) } }.wait()
    }

    @Test func onlyRangesWhollyInThePageCacheAreOfferedForSending() throws {
        let size = 1 << 20, offset = 256 << 10, length = 128 << 10
        let (path, fd) = try evictedFile(size: size, name: "send.raw")
        defer { Glibc.close(fd) }
        try #require(!(try isResident(fd, at: offset, fileSize: size)), "the kernel kept the page cached")
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        #expect(try cachedExtent(node, Int64(offset), length) == nil)
        _ = try read(node, Int64(offset), length)
        let extent = try #require(try cachedExtent(node, Int64(offset), length))
        #expect(extent.offset == Int64(offset) && extent.length == length)
        // One page short of cached is not enough.
        #expect(try cachedExtent(node, Int64(offset), length + 4096) == nil)
        #expect(try cachedExtent(node, Int64(size - 4096), 8192) == nil)
        try close(graph, io)
    }

    @Test func holesAndODirectFilesAreNotOfferedForSending() throws {
        let path = try makeFile(size: 64 << 10, name: "sparse.raw")
        #expect(truncate(path, 1 << 20) == 0)
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        _ = try read(node, 0, 1 << 20)  // the hole's zero pages are cached now
        #expect(try cachedExtent(node, 0, 64 << 10) != nil)
        #expect(try cachedExtent(node, 512 << 10, 64 << 10) == nil)
        #expect(try cachedExtent(node, 32 << 10, 64 << 10) == nil)
        try close(graph, io)

        let (directGraph, directNode, directIO) = try open(path, direct: true, aio: .threads)
        #expect(try cachedExtent(directNode, 0, 64 << 10) == nil)
        try close(directGraph, directIO)
    }
}
