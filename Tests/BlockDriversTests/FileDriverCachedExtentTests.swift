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
        try passColdStream(node, Int64(offset), length)
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

    /// Asks for a cached range until the cold stream a miss started has
    /// passed, expecting each answer to be nil meanwhile.
    func passColdStream(_ node: BlockNode, _ offset: Int64, _ length: Int) throws {
        let asks = Int(FileDriver.coldStreamLength) / length
        let offered = try (0..<asks).filter { _ in try cachedExtent(node, offset, length) != nil }.count
        #expect(offered == 0, "cached ranges right after a miss go the usual way")
    }

    /// After a miss, cached ranges go the usual way (read into a buffer on
    /// the pool) for `coldStreamLength` bytes: pages readahead has only just
    /// brought in. A stream without misses keeps being offered.
    @Test(.enabled(if: kernelHasCachestat, "no cachestat(2) here"))
    func cachedRangesRightAfterAMissAreReadAsUsual() throws {
        let size = 1 << 20, length = 256 << 10
        let (path, fd) = try evictedFile(size: size, name: "cold.raw")
        defer { Glibc.close(fd) }
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        defer { try? close(graph, io) }
        try #require(!(try isResident(fd, at: 0, fileSize: size)), "the kernel kept the page cached")
        #expect(try cachedExtent(node, 0, length) == nil, "a miss")
        _ = try read(node, 0, size)
        try passColdStream(node, Int64(length), length)
        // The stream has passed: every cached range is offered again.
        for offset in stride(from: 0, to: size, by: length) {
            #expect(try cachedExtent(node, Int64(offset), length)?.offset == Int64(offset))
        }
        // A range past the end is no miss: it starts no cold stream.
        #expect(try cachedExtent(node, Int64(size - 4096), 8192) == nil)
        #expect(try cachedExtent(node, 0, length) != nil)
    }

    /// A cold stream whose readahead keeps ahead of it has no misses, but
    /// the front of that readahead shows: the page `coldStreamLength` past
    /// a range not cached yet starts a cold stream, as a miss does.
    @Test(.enabled(if: kernelHasCachestat, "no cachestat(2) here"))
    func cachedRangesBehindAReadaheadFrontAreReadAsUsual() throws {
        let length = 256 << 10
        let front = Int64(length) + FileDriver.coldStreamLength  // the page asked about for [0, length)
        let size = Int(front) + (1 << 20)
        let path = try makeFile(size: 1 << 20, name: "front.raw")
        let fd = Glibc.open(path, O_RDWR)
        try #require(fd >= 0)
        defer { Glibc.close(fd) }
        // Data at the front too (a sparse file's hole might not be cached
        // when read), then nothing of the file cached.
        let page = [UInt8](repeating: 7, count: 4096)
        try #require(pwrite(fd, page, page.count, off_t(front)) == page.count)
        #expect(ftruncate(fd, off_t(size)) == 0)
        #expect(fdatasync(fd) == 0)
        #expect(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
        let (graph, node, io) = try open(path, direct: false, aio: .threads)
        defer { try? close(graph, io) }
        _ = try read(node, 0, 1 << 20)
        try #require(!(try isResident(fd, at: Int(front), fileSize: size)), "the kernel read the front ahead")
        #expect(try cachedExtent(node, 0, length) == nil, "the front is not cached yet")
        _ = try read(node, front, 4096)
        try passColdStream(node, 0, length)
        #expect(try cachedExtent(node, 0, length)?.offset == 0, "the stream has passed and the front is cached")
    }
}
