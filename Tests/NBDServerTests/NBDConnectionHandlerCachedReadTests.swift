import BlockLayer
import Glibc
import NBDProtocol
import NBDTestSupport
@testable import NBDServer
import NIOCore
import Testing

/// READs whose data the driver offers as a cached file range go out as a
/// reply header and a `FileRegion` for the kernel to send.
extension NBDConnectionHandlerTests {
    @Test func cachedReadsGoOutAsAHeaderAndAFileRegion() throws {
        try negotiate()
        let file = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: open("/dev/zero", O_RDONLY | O_CLOEXEC))
        defer { try? file.close() }
        driver.cachedFile = file
        defer { driver.cachedFile = nil }

        try send(Wire.request(type: 0, cookie: 5, offset: 65536, length: 128 << 10))
        try expectCachedReply(cookie: 5, offset: 65536, length: 128 << 10)

        // Short reads are copied as before: too little to save.
        try send(Wire.request(type: 0, cookie: 6, offset: 0, length: 4096))
        #expect(chunks(try outbound()).map(\.cookie) == [6])
    }

    @Test func readsTheCacheMissedAreFilledIntoItAndSentFromThere() throws {
        try negotiate()
        let file = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: open("/dev/zero", O_RDONLY | O_CLOEXEC))
        defer { try? file.close() }
        driver.fillAnswer = true
        driver.fillFile = file
        defer { (driver.fillAnswer, driver.fillFile, driver.cachedFile) = (nil, nil, nil) }

        try send(Wire.request(type: 0, cookie: 7, offset: 131072, length: 256 << 10))
        #expect(driver.fills.map(\.offset) == [131072] && driver.fills.map(\.length) == [256 << 10])
        try expectCachedReply(cookie: 7, offset: 131072, length: 256 << 10)

        // A fill that cannot be done: read as usual.
        (driver.fillAnswer, driver.cachedFile) = (false, nil)
        try send(Wire.request(type: 0, cookie: 8, offset: 0, length: 128 << 10))
        #expect(chunks(try outbound()).map(\.cookie) == [8])
        #expect(driver.fills.count == 2)
        #expect(graph.backends.first?.inFlight == 0)

        // Short reads are not worth a fill.
        try send(Wire.request(type: 0, cookie: 9, offset: 0, length: 4096))
        #expect(chunks(try outbound()).map(\.cookie) == [9])
        #expect(driver.fills.count == 2)
    }

    /// A drain waits for a fill in flight; a READ whose fill ends while
    /// the export is drained waits its turn and is then read as usual.
    @Test func aDrainWaitsForAFillAndTheReadAfterItWaitsForTheDrain() throws {
        try negotiate()
        let file = NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: open("/dev/zero", O_RDONLY | O_CLOEXEC))
        defer { try? file.close() }
        (driver.fillAnswer, driver.fillFile) = (true, file)
        defer { (driver.fillAnswer, driver.fillFile, driver.cachedFile, driver.holdCompletions) = (nil, nil, nil, false) }
        driver.holdCompletions = true
        try send(Wire.request(type: 0, cookie: 10, offset: 0, length: 128 << 10))
        #expect(driver.fills.count == 1)

        let backend = try #require(graph.backends.first)
        var drained = false
        backend.beginDrain().whenSuccess { drained = true }
        loop.run()
        #expect(!drained, "the fill is in flight")
        driver.release()
        loop.run()
        #expect(drained)
        #expect(try channel.readOutbound(as: IOData.self) == nil, "the READ waits for the drain to end")

        driver.holdCompletions = false
        backend.endDrain()
        loop.run()
        #expect(chunks(try outbound()).map(\.cookie) == [10], "read into a buffer: the export was drained")
        #expect(backend.inFlight == 0)
    }

    /// The next outbound writes are a READ's reply header for the whole
    /// range and the file region to send, and the read has ended.
    func expectCachedReply(cookie: UInt64, offset: UInt64, length: Int) throws {
        guard case .byteBuffer(var header)? = try channel.readOutbound(as: IOData.self) else {
            Issue.record("no reply header")
            return
        }
        #expect(header.readInteger(as: UInt32.self) == NBDMagic.structuredReply)
        #expect(header.readInteger(as: UInt16.self) == 1, "the only chunk is the last")
        #expect(header.readInteger(as: UInt16.self) == NBDChunkType.offsetData.rawValue)
        #expect(header.readInteger(as: UInt64.self) == cookie)
        #expect(header.readInteger(as: UInt32.self) == UInt32(8 + length))
        #expect(header.readInteger(as: UInt64.self) == offset)
        #expect(header.readableBytes == 0)
        guard case .fileRegion(let region)? = try channel.readOutbound(as: IOData.self) else {
            Issue.record("no file region after the header")
            return
        }
        #expect(region.readerIndex == Int(offset) && region.endIndex == Int(offset) + length)
        #expect(graph.backends.first?.inFlight == 0, "the read ended once its data was written")
    }
}
