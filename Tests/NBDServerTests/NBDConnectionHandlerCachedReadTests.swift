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
