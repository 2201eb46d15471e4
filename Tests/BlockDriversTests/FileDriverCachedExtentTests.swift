@testable import BlockDrivers
import BlockLayer
import CLinuxAIO
import Foundation
import Glibc
import NIOCore
import Testing

/// Which reads the file driver offers for `sendfile` (`CachedFileExtent`).
extension FileDriverTests {
    /// cachestat(2) came with Linux 6.5, and seccomp profiles may refuse it.
    static let kernelHasCachestat: Bool = {
        let fd = Glibc.open("/proc/self/exe", O_RDONLY | O_CLOEXEC)
        defer { if fd >= 0 { Glibc.close(fd) } }
        return fd >= 0 && strata_cached_pages(fd, 0, 4096) >= 0
    }()

    func cachedExtent(_ node: BlockNode, _ offset: Int64, _ length: Int) throws -> (offset: Int64, length: Int)? {
        try loop.submit { node.cachedFileExtent(at: offset, length: length).map { ($0.offset, $0.length) } }.wait()
    }

    @Test(.enabled(if: kernelHasCachestat, "no cachestat(2) here"))
    func onlyRangesWhollyInThePageCacheAreOfferedForSending() throws {
        let size = 1 << 20, offset = 256 << 10, length = 128 << 10
        let (path, fd) = try evictedFile(size: size, name: "send.raw")
        defer { Glibc.close(fd) }
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        defer { try? close(graph, io) }
        try #require(!(try isResident(fd, at: offset, fileSize: size)), "the kernel kept the page cached")
        #expect(try cachedExtent(node, Int64(offset), length) == nil)
        _ = try read(node, Int64(offset), length)
        let extent = try #require(try cachedExtent(node, Int64(offset), length))
        #expect(extent.offset == Int64(offset) && extent.length == length)
        // One page short of cached is not enough; nor is a range past the end.
        #expect(try cachedExtent(node, Int64(offset), length + 4096) == nil)
        #expect(try cachedExtent(node, Int64(size - 4096), 8192) == nil)
    }

    @Test(.enabled(if: kernelHasCachestat, "no cachestat(2) here"))
    func holesAndODirectFilesAreNotOfferedForSending() throws {
        let path = try makeFile(size: 64 << 10, name: "sparse.raw")
        #expect(truncate(path, 1 << 20) == 0)
        do {
            let (graph, node, io) = try open(path, direct: false, aio: .threads)
            defer { try? close(graph, io) }
            _ = try read(node, 0, 1 << 20)  // the hole's zero pages are cached now
            #expect(try cachedExtent(node, 0, 64 << 10) != nil)
            #expect(try cachedExtent(node, 512 << 10, 64 << 10) == nil)
            #expect(try cachedExtent(node, 32 << 10, 64 << 10) == nil)
        }
        let (graph, node, io) = try open(path, direct: true, aio: .threads)
        defer { try? close(graph, io) }
        #expect(try cachedExtent(node, 0, 64 << 10) == nil)
    }

    func fill(_ node: BlockNode, _ offset: Int64, _ length: Int) throws -> Bool {
        try loop.flatSubmit { () -> EventLoopFuture<Bool> in
            let promise = self.loop.makePromise(of: Bool.self)
            node.fillPageCache(at: offset, length: length) { promise.succeed($0) }
            return promise.futureResult
        }.wait()
    }

    @Test(.enabled(if: kernelHasCachestat, "no cachestat(2) here"), arguments: [256 << 10, 2560 << 10])
    func aFilledRangeIsInThePageCacheAndOfferedForSending(length: Int) throws {
        // 2.5 MiB takes three turns through a 1 MiB pipe.
        let size = 4 << 20, offset = 256 << 10
        let (path, fd) = try evictedFile(size: size, name: "fill.raw")
        defer { Glibc.close(fd) }
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        defer { try? close(graph, io) }
        try #require(!(try isResident(fd, at: offset + length - 4096, fileSize: size)), "the kernel kept the page cached")
        #expect(try loop.submit { node.fillsPageCache }.wait())
        #expect(try cachedExtent(node, Int64(offset), length) == nil)

        #expect(try fill(node, Int64(offset), length))
        #expect(try isResident(fd, at: offset, fileSize: size) && isResident(fd, at: offset + length - 4096, fileSize: size))
        let extent = try #require(try cachedExtent(node, Int64(offset), length))
        #expect(extent.offset == Int64(offset) && extent.length == length)
        #expect(try read(node, Int64(offset), length) == (offset..<offset + length).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) })
        #expect(try !fill(node, Int64(size - 4096), 8192), "past the end of the file")
    }

    @Test func aFillStopsAtTheEndOfTheFile() throws {
        let (_, fd) = try evictedFile(size: 64 << 10, name: "short-fill.raw")
        defer { Glibc.close(fd) }
        let filler = try #require(PageCacheFiller.shared)
        #expect(filler.fill(fd: fd, offset: 60 << 10, length: 8 << 10) == 4 << 10)
        #expect(filler.fill(fd: fd, offset: 64 << 10, length: 4 << 10) == 0)
        let directory = Glibc.open(directory.path, O_RDONLY | O_DIRECTORY)
        defer { Glibc.close(directory) }
        #expect(filler.fill(fd: directory, offset: 0, length: 4096) < 0, "a directory cannot be read")
        #expect(filler.fill(fd: fd, offset: 0, length: 4096) == 4096, "the pipe is still good")
    }

    @Test func holesAndODirectFilesAreNotFilled() throws {
        let path = try makeFile(size: 64 << 10, name: "sparse-fill.raw")
        #expect(truncate(path, 1 << 20) == 0)
        let fd = Glibc.open(path, O_RDONLY)
        defer { Glibc.close(fd) }
        do {
            let (graph, node, io) = try open(path, direct: false, aio: .threads)
            defer { try? close(graph, io) }
            #expect(try !fill(node, 512 << 10, 64 << 10))
            #expect(try !fill(node, 32 << 10, 64 << 10), "part data, part hole")
            #expect(try !isResident(fd, at: 512 << 10, fileSize: 1 << 20), "no zero pages for the hole")
        }
        let (graph, node, io) = try open(path, direct: true, aio: .threads)
        defer { try? close(graph, io) }
        #expect(try !loop.submit { node.fillsPageCache }.wait())
        #expect(try !fill(node, 0, 64 << 10))
    }
}
