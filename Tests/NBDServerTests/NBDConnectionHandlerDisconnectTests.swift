import BlockLayer
import NBDProtocol
@testable import NBDServer
import NBDTestSupport
import NIOCore
import NIOEmbedded
import Testing

/// How a connection ends: DISC (with requests in flight, with input after
/// it, with flags it should not carry), a client closing its side, and
/// what the handler lets go of afterwards.
extension NBDConnectionHandlerTests {
    /// Negotiates, then sends a READ the disk holds back, then DISC.
    func sendReadThenDisconnect() throws {
        try negotiate()
        driver.holdCompletions = true
        var requests = Wire.request(type: 0, cookie: 1, offset: 0, length: 512)
        var disc = Wire.request(type: 2, cookie: 2)
        requests.writeBuffer(&disc)
        try send(requests)
    }

    /// A server shutting down answers the requests in flight, then every
    /// request queued behind the in-flight limit with ESHUTDOWN, then
    /// closes. Queued ones went unanswered before, and with nothing in
    /// flight only the first got its ESHUTDOWN.
    @Test func serverShutdownAnswersEveryQueuedRequest() throws {
        try negotiate()
        driver.holdCompletions = true
        var requests = ByteBuffer()
        for cookie in UInt64(1)...7 {
            requests.writeImmutableBuffer(Wire.request(type: 0, cookie: cookie, offset: 0, length: 512))
        }
        try send(requests)  // four in flight (the suite's limit), three queued
        handler.serverShutdown()
        loop.run()
        #expect(channel.isActive, "the reads in flight are still answered")
        driver.release()
        loop.run()
        let replies = chunks(try outbound())
        #expect(Set(replies.filter { $0.flags & 1 != 0 }.map(\.cookie)) == Set(UInt64(1)...7))
        let refused = replies.filter { $0.type == NBDChunkType.error.rawValue }
        #expect(refused.map(\.cookie) == [5, 6, 7])
        #expect(refused.allSatisfy { $0.payload.prefix(4) == [0, 0, 0, 108] }, "ESHUTDOWN")
        #expect(!channel.isActive)
    }

    @Test func disconnectWaitsForRequestsInFlight() throws {
        try sendReadThenDisconnect()
        #expect(channel.isActive, "the read is still in flight")
        driver.release()
        loop.run()
        #expect(chunks(try outbound()).count == 1, "the read was answered before closing")
        #expect(!channel.isActive)
    }

    /// A closed connection's handler is freed, at once or, with a request
    /// in flight, once that request ends: kept alive by its own context, a
    /// kilobyte stayed behind for every connection ever made.
    @Test(arguments: [false, true])
    func aClosedConnectionLetsItsHandlerGo(withRequestInFlight: Bool) throws {
        weak var released: NBDConnectionHandler?
        do {
            let channel = EmbeddedChannel(loop: loop)
            let handler = NBDConnectionHandler(registry: registry, configuration: .init(maxInFlight: 4))
            released = handler
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.connect(to: SocketAddress(unixDomainSocketPath: "/x")).wait()
            if withRequestInFlight {
                var hello = ByteBuffer()
                hello.writeInteger(UInt32(3))
                var go = Wire.option(7, Wire.goPayload("disk"))
                hello.writeBuffer(&go)
                var read = Wire.request(type: 0, cookie: 1, offset: 0, length: 512)
                hello.writeBuffer(&read)
                driver.holdCompletions = true
                try channel.writeInbound(hello)
                loop.run()
            }
            _ = try channel.close().wait()
            loop.run()
        }
        if withRequestInFlight {
            #expect(released != nil, "the read still holds it")
            driver.release()
            loop.run()
        }
        #expect(released == nil)
    }

    /// What a client sends after DISC, while it leaves its last replies
    /// unread, is dropped: kept, it grew without end until the server died
    /// of an overflowing buffer index.
    @Test func bytesSentAfterDisconnectAreDropped() throws {
        try sendReadThenDisconnect()
        for _ in 0..<64 {
            var flushes = ByteBuffer()
            for cookie in 0..<512 {
                var flush = Wire.request(type: 3, cookie: UInt64(cookie))
                flushes.writeBuffer(&flush)
            }
            try send(flushes)
        }
        #expect(handler.unparsedBytes == 0)
        driver.release()
        loop.run()
        #expect(chunks(try outbound()).count == 1, "only the read is answered")
        #expect(!channel.isActive)
    }

    /// After DISC the server asks its socket for nothing more: a client
    /// that leaves its last replies unread and keeps writing would
    /// otherwise have it read and drop as fast as the client sends.
    @Test func nothingIsReadAfterDisconnect() throws {
        let reads = ReadCounter()
        try channel.pipeline.syncOperations.addHandler(reads, position: .first)
        channel.read()
        #expect(reads.count == 1, "reads pass while the connection is open")
        try sendReadThenDisconnect()
        let before = reads.count
        channel.read()
        channel.read()
        #expect(reads.count == before)
        driver.release()
        loop.run()
        #expect(chunks(try outbound()).count == 1, "the read in flight is still answered")
        #expect(!channel.isActive)
    }

    /// Counts the reads that reach the socket's end of the pipeline.
    final class ReadCounter: ChannelOutboundHandler {
        typealias OutboundIn = Any
        var count = 0
        func read(context: ChannelHandlerContext) {
            count += 1
            context.read()
        }
    }

    /// A DISC with flags it should not carry still closes the connection,
    /// without a reply (the client no longer reads them).
    @Test func disconnectWithUnexpectedFlagsClosesWithoutAReply() throws {
        try negotiate()
        try send(Wire.request(type: 2, flags: 0x40, cookie: 2, offset: 1 << 40, length: 7))
        loop.run()
        #expect(try outbound().readableBytes == 0)
        #expect(!channel.isActive)
    }

    /// A client that pipelines more requests than may run at once, then
    /// DISC (or nothing), then closes its side, as libnbd's shutdown does.
    /// NIO reads to the end at EOF even while parsing is paused, so those
    /// requests wait in the handler's buffer: each is still carried out
    /// and answered before the connection closes.
    @Test(arguments: [true, false])
    func requestsSentBeforeTheClientClosedItsSideAreAllAnswered(endWithDisconnect: Bool) throws {
        try negotiate()
        driver.holdCompletions = true
        var requests = ByteBuffer()
        for cookie in 1...6 {
            var write = Wire.request(type: 1, cookie: UInt64(cookie), offset: UInt64(cookie) * 512, length: 4,
                                     payload: [UInt8(cookie), 0xAA, 0xBB, 0xCC])
            requests.writeBuffer(&write)
        }
        for cookie in 7...10 {
            var read = Wire.request(type: 0, cookie: UInt64(cookie), offset: 0, length: 512)
            requests.writeBuffer(&read)
        }
        if endWithDisconnect {
            var disc = Wire.request(type: 2, cookie: 11)
            requests.writeBuffer(&disc)
        }
        // Half a request after the last whole one: dropped, as it never arrived.
        requests.writeBytes(Wire.request(type: 0, cookie: 12, offset: 0, length: 512).readableBytesView.prefix(13))
        try send(requests)
        channel.pipeline.fireUserInboundEventTriggered(ChannelEvent.inputClosed)
        loop.run()
        #expect(driver.held.count == 4, "still no more than maxInFlight at once")
        #expect(channel.isActive)
        while !driver.held.isEmpty {
            driver.release()
            loop.run()
        }
        #expect(answeredCookies(try outbound()).sorted() == Array(1...10),
                "every whole request before the end was answered once, and nothing else")
        for cookie in 1...6 {
            #expect(driver.data[cookie * 512..<cookie * 512 + 4] == [UInt8(cookie), 0xAA, 0xBB, 0xCC])
        }
        #expect(!channel.isActive, "closed once they were")
    }
}
