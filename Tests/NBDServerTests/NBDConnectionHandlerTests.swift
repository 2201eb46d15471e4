import BlockLayer
import NBDProtocol
@testable import NBDServer
import NBDTestSupport
import NIOCore
import NIOEmbedded
import Testing

/// The connection handler end to end over an EmbeddedChannel: bytes in,
/// bytes out, against an in-memory disk.
@Suite final class NBDConnectionHandlerTests {
    let loop = EmbeddedEventLoop()
    let channel: EmbeddedChannel
    let graph: BlockGraph
    let driver = RAMDriver(size: 1 << 20)
    let registry = NBDExportRegistry()
    let burst = CompletionBurst()
    let handler: NBDConnectionHandler

    init() throws {
        channel = EmbeddedChannel(loop: loop)
        graph = BlockGraph(eventLoop: loop)
        let node = try graph.addNode(name: "ram", driver: driver)
        let backend = try graph.attachBackend(name: "disk", to: node, perm: [.consistentRead, .write], shared: .all)
        try registry.add(NBDExport(name: "disk", backend: backend, readOnly: false))
        handler = NBDConnectionHandler(registry: registry, configuration: .init(maxInFlight: 4, completionBurst: burst))
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(unixDomainSocketPath: "/x")).wait()
    }

    deinit {
        _ = try? channel.finish()
    }

    func outbound() throws -> ByteBuffer {
        var all = ByteBuffer()
        while var part = try channel.readOutbound(as: ByteBuffer.self) { all.writeBuffer(&part) }
        return all
    }

    func send(_ bytes: ByteBuffer, chunk: Int = .max) throws {
        var bytes = bytes
        while bytes.readableBytes > 0 {
            let piece = bytes.readSlice(length: min(chunk, bytes.readableBytes))!
            try channel.writeInbound(piece)
        }
        loop.run()
    }

    /// Negotiates structured replies and base:allocation, then GO.
    func negotiate(chunk: Int = .max) throws {
        var greeting = try outbound()
        #expect(greeting.readInteger(as: UInt64.self) == NBDMagic.greeting)
        var hello = ByteBuffer()
        hello.writeInteger(UInt32(3))
        for option in [Wire.option(8), Wire.option(10, Wire.metaPayload("disk", queries: ["base:allocation"])),
                       Wire.option(7, Wire.goPayload("disk"))] {
            var option = option
            hello.writeBuffer(&option)
        }
        try send(hello, chunk: chunk)
        let replies = Wire.replies(try outbound())
        #expect(replies.last?.1 == NBDOptionReplyType.ack.rawValue)
    }

    struct Chunk {
        var flags: UInt16
        var type: UInt16
        var cookie: UInt64
        var payload: [UInt8]
    }

    /// The cookie of each request the replies answer: every simple reply
    /// (expected to carry no error) and the chunk with the done flag of
    /// every structured reply.
    func answeredCookies(_ buffer: ByteBuffer) -> [UInt64] {
        var replies = buffer
        var cookies: [UInt64] = []
        while replies.readableBytes > 0 {
            let magic = replies.readInteger(as: UInt32.self)
            if magic == NBDMagic.simpleReply {
                #expect(replies.readInteger(as: UInt32.self) == 0)
                cookies.append(replies.readInteger(as: UInt64.self)!)
            } else {
                #expect(magic == NBDMagic.structuredReply)
                let flags = replies.readInteger(as: UInt16.self)!
                _ = replies.readInteger(as: UInt16.self)
                let cookie = replies.readInteger(as: UInt64.self)!
                if flags & 1 != 0 { cookies.append(cookie) }
                let length = Int(replies.readInteger(as: UInt32.self)!)
                replies.moveReaderIndex(forwardBy: length)
            }
        }
        return cookies
    }

    func chunks(_ buffer: ByteBuffer) -> [Chunk] {
        var buffer = buffer
        var result: [Chunk] = []
        while buffer.readableBytes >= 20, buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) == NBDMagic.structuredReply {
            _ = buffer.readInteger(as: UInt32.self)
            let flags = buffer.readInteger(as: UInt16.self)!
            let type = buffer.readInteger(as: UInt16.self)!
            let cookie = buffer.readInteger(as: UInt64.self)!
            let length = buffer.readInteger(as: UInt32.self)!
            result.append(Chunk(flags: flags, type: type, cookie: cookie, payload: buffer.readBytes(length: Int(length))!))
        }
        return result
    }

    @Test(arguments: [1, 7, Int.max])
    func writeThenReadBackAsDataAndHoles(chunk: Int) throws {
        try negotiate(chunk: chunk)
        try send(Wire.request(type: 1, cookie: 1, offset: 4096, length: 4, payload: [1, 2, 3, 4]), chunk: chunk)
        var reply = try outbound()
        #expect(reply.readInteger(as: UInt32.self) == NBDMagic.simpleReply)
        #expect(reply.readInteger(as: UInt32.self) == 0)
        #expect(reply.readInteger(as: UInt64.self) == 1)
        try send(Wire.request(type: 0, cookie: 2, offset: 4094, length: 8), chunk: chunk)
        let data = chunks(try outbound())
        #expect(data.count == 1)
        #expect(data[0].type == NBDChunkType.offsetData.rawValue && data[0].flags == 1)
        #expect(Array(data[0].payload.dropFirst(8)) == [0, 0, 1, 2, 3, 4, 0, 0])
        try send(Wire.request(type: 0, cookie: 3, offset: 65536, length: 4096), chunk: chunk)
        let hole = chunks(try outbound())
        #expect(hole.map(\.type) == [NBDChunkType.offsetHole.rawValue])
    }

    @Test func aSparseReadSendsItsHolesAsHoleChunks() throws {
        try negotiate()
        try send(Wire.request(type: 1, cookie: 1, offset: 4096, length: 4, payload: [1, 2, 3, 4]))
        try send(Wire.request(type: 1, cookie: 2, offset: 300_000, length: 2, payload: [5, 6]))
        _ = try outbound()
        try send(Wire.request(type: 0, cookie: 3, offset: 0, length: 512 * 1024))
        let reply = chunks(try outbound())
        #expect(reply.map(\.type) == [NBDChunkType.offsetData.rawValue, NBDChunkType.offsetHole.rawValue,
                                      NBDChunkType.offsetData.rawValue, NBDChunkType.offsetHole.rawValue])
        #expect(reply.map(\.flags) == [0, 0, 0, 1])
        // Reassembled, the chunks cover the read exactly and hold the data.
        var image = [UInt8](repeating: 0xff, count: 512 * 1024)
        for chunk in reply {
            var payload = ByteBuffer(bytes: chunk.payload)
            let offset = Int(payload.readInteger(as: UInt64.self)!)
            if chunk.type == NBDChunkType.offsetHole.rawValue {
                let length = Int(payload.readInteger(as: UInt32.self)!)
                for index in offset..<(offset + length) { image[index] = 0 }
            } else {
                let bytes = payload.readBytes(length: payload.readableBytes)!
                image.replaceSubrange(offset..<(offset + bytes.count), with: bytes)
            }
        }
        var expected = [UInt8](repeating: 0, count: 512 * 1024)
        expected.replaceSubrange(4096..<4100, with: [1, 2, 3, 4])
        expected.replaceSubrange(300_000..<300_002, with: [5, 6])
        #expect(image == expected)
        // With DF, one data chunk.
        try send(Wire.request(type: 0, flags: NBDCommandFlags.dontFragment.rawValue, cookie: 4, offset: 0, length: 512 * 1024))
        #expect(chunks(try outbound()).map(\.type) == [NBDChunkType.offsetData.rawValue])
    }

    @Test func blockStatusRepliesPerContextWithMergedExtents() throws {
        try negotiate()
        try send(Wire.request(type: 1, cookie: 1, offset: 0, length: 1, payload: [9]))
        _ = try outbound()
        try send(Wire.request(type: 7, cookie: 5, offset: 0, length: 1 << 20))
        let reply = chunks(try outbound())
        #expect(reply.count == 1)
        var payload = ByteBuffer(bytes: reply[0].payload)
        #expect(payload.readInteger(as: UInt32.self) == 0)
        var extents: [(UInt32, UInt32)] = []
        while let length = payload.readInteger(as: UInt32.self), let flags = payload.readInteger(as: UInt32.self) {
            extents.append((length, flags))
        }
        #expect(extents.map(\.0) == [65536, (1 << 20) - 65536])
        #expect(extents.map(\.1) == [0, 3])
        try send(Wire.request(type: 7, flags: NBDCommandFlags.reqOne.rawValue, cookie: 6, offset: 0, length: 1 << 20))
        let one = chunks(try outbound())
        #expect(one[0].payload.count == 4 + 8)
    }

    @Test func invalidRequestsGetErrorChunksAndTheConnectionGoesOn() throws {
        try negotiate()
        try send(Wire.request(type: 0, flags: NBDCommandFlags.fastZero.rawValue, cookie: 9, offset: 0, length: 8))
        let error = chunks(try outbound())
        #expect(error.first?.type == NBDChunkType.error.rawValue)
        #expect(error.first?.payload.prefix(4) == [0, 0, 0, 22])
        try send(Wire.request(type: 0, cookie: 10, offset: (1 << 20) - 4, length: 8))
        #expect(chunks(try outbound()).first?.payload.prefix(4) == [0, 0, 0, 22])
        try send(Wire.request(type: 1, cookie: 11, offset: (1 << 20) - 2, length: 4, payload: [1, 2, 3, 4]))
        var enospc = try outbound()
        #expect(chunks(enospc).first?.payload.prefix(4) == [0, 0, 0, 28])
        enospc.clear()
        try send(Wire.request(type: 0, cookie: 12, offset: 0, length: 8))
        #expect(chunks(try outbound()).first?.type == NBDChunkType.offsetHole.rawValue)
        #expect(channel.isActive)
    }

    @Test func diskErrorsReachTheClientAndTheConnectionGoesOn() throws {
        try negotiate()
        driver.failure = BlockError(errno: 5, "I/O error")
        try send(Wire.request(type: 0, cookie: 1, offset: 0, length: 4096))
        let read = chunks(try outbound())
        #expect(read.first?.type == NBDChunkType.error.rawValue)
        #expect(read.first?.payload.prefix(4) == [0, 0, 0, 5])
        driver.failure = BlockError(errno: 28, "No space left on device")
        try send(Wire.request(type: 1, cookie: 2, offset: 0, length: 4, payload: [1, 2, 3, 4]))
        let write = chunks(try outbound())
        #expect(write.first?.type == NBDChunkType.error.rawValue)
        #expect(write.first?.payload.prefix(4) == [0, 0, 0, 28])
        driver.failure = nil
        try send(Wire.request(type: 1, cookie: 3, offset: 0, length: 4, payload: [1, 2, 3, 4]))
        var ok = try outbound()
        #expect(ok.readInteger(as: UInt32.self) == NBDMagic.simpleReply)
        #expect(ok.readInteger(as: UInt32.self) == 0)
        #expect(channel.isActive)
    }

    @Test func badRequestMagicClosesTheConnection() throws {
        try negotiate()
        try send(Wire.request(type: 0, magic: 0xbad))
        #expect(!channel.isActive)
    }

    @Test(arguments: [1000, 3 * 4096 + 5])
    func writePayloadsArrivingInPiecesStayIntactWhileInFlight(chunk: Int) throws {
        // Each payload spans several reads; earlier payloads are still being
        // written (held) while later bytes arrive into the same buffers.
        try negotiate()
        driver.holdCompletions = true
        var stream = ByteBuffer()
        let length = 20_000
        for cookie in 1...3 {
            var write = Wire.request(type: 1, cookie: UInt64(cookie), offset: UInt64((cookie - 1) * length),
                                     length: UInt32(length), payload: pattern(cookie, length))
            stream.writeBuffer(&write)
        }
        try send(stream, chunk: chunk)
        #expect(driver.held.count == 3)
        driver.release()
        loop.run()
        for cookie in 1...3 {
            let start = (cookie - 1) * length
            #expect(Array(driver.data[start..<start + length]) == pattern(cookie, length))
        }
    }

    /// Reads may end anywhere in a request: in its header, in its payload,
    /// or exactly between two. Whatever the split, every request is parsed
    /// once and every payload lands whole (the parser completes a split
    /// header from the front of the next read, then goes on in place).
    @Test(arguments: [1, 2, 5, 27, 28, 29, 55, 56, 57, 100, 4123, 4124, 4125, 9000])
    func requestsSplitAnywhereAcrossReadsParseOnce(chunk: Int) throws {
        try negotiate(chunk: chunk)
        var stream = ByteBuffer()
        var expected = [UInt8](repeating: 0, count: 64 << 10)
        let lengths = [4096, 1, 4096, 100, 27, 4096, 3000]
        for (index, length) in lengths.enumerated() {
            let offset = index * 8192 + index
            let payload = pattern(index + 1, length)
            expected.replaceSubrange(offset..<offset + length, with: payload)
            var write = Wire.request(type: 1, cookie: UInt64(index + 1), offset: UInt64(offset),
                                     length: UInt32(length), payload: payload)
            stream.writeBuffer(&write)
            var read = Wire.request(type: 0, cookie: UInt64(100 + index), offset: UInt64(offset), length: 16)
            stream.writeBuffer(&read)
        }
        try send(stream, chunk: chunk)
        let cookies = answeredCookies(try outbound())
        #expect(cookies.sorted() == (1...UInt64(lengths.count)).map { $0 } + (100..<100 + UInt64(lengths.count)).map { $0 })
        #expect(Array(driver.data[0..<expected.count]) == expected)
    }

    /// However many reads a request is split over, completing it copies
    /// at most three times its length: a 30,000-byte WRITE arriving a byte
    /// at a time once copied its whole start on every read (450 MB).
    @Test(arguments: [1, 1000, 20_000])
    func aRequestSplitOverManyReadsIsCopiedBoundedly(chunk: Int) throws {
        try negotiate()
        let length = 30_000
        var stream = Wire.request(type: 1, cookie: 1, offset: 0, length: UInt32(length), payload: pattern(9, length))
        let message = stream.readableBytes
        var read = Wire.request(type: 0, cookie: 2, offset: 0, length: 16)
        stream.writeBuffer(&read)
        try send(stream, chunk: chunk)
        #expect(handler.bytesJoined <= 3 * message + 64 + NBDRequestDecoder.headerSize)
        #expect(Array(driver.data[0..<length]) == pattern(9, length))
        let replies = try outbound()
        #expect(replies.readableBytes > NBDReplyEncoder.simpleReplyHeaderSize, "both answered")
    }

    @Test(arguments: [1000, 65536 + 7, Int.max])
    func longWritePayloadsArriveIntoAlignedBuffersOfTheirOwn(chunk: Int) throws {
        // Long payloads are copied out of the inbound buffer as they arrive,
        // into memory the node can use for O_DIRECT without a bounce; short
        // ones between them stay slices.
        driver.memoryAlignment = 4096
        registry.export(named: "disk")!.backend.node!.refreshLimits()
        try negotiate()
        driver.holdCompletions = true
        let long = 100_000
        var stream = ByteBuffer()
        let writes: [(cookie: Int, offset: Int, length: Int)] = [(1, 0, long), (2, long, 5), (3, 2 * long, long), (4, 3 * long, long)]
        for write in writes {
            var request = Wire.request(type: 1, cookie: UInt64(write.cookie), offset: UInt64(write.offset),
                                       length: UInt32(write.length), payload: pattern(write.cookie, write.length))
            stream.writeBuffer(&request)
        }
        try send(stream, chunk: chunk)
        #expect(driver.held.count == 4)
        #expect(graph.bufferPool.taken == 1, "only the short write was copied into aligned memory")
        driver.release()
        loop.run()
        for write in writes {
            #expect(Array(driver.data[write.offset..<write.offset + write.length]) == pattern(write.cookie, write.length))
        }
        let replies = try outbound()
        #expect(replies.readableBytes == 4 * NBDReplyEncoder.simpleReplyHeaderSize)
    }

    @Test func aLongWriteThatIsRefusedLeavesTheStreamInSync() throws {
        try negotiate()
        let long = 100_000
        var stream = Wire.request(type: 1, cookie: 1, offset: (1 << 20) - 4096, length: UInt32(long),
                                  payload: pattern(1, long))
        var read = Wire.request(type: 0, cookie: 2, offset: 0, length: 8)
        stream.writeBuffer(&read)
        try send(stream, chunk: 4000)
        let replies = chunks(try outbound())
        #expect(replies.map(\.cookie) == [1, 2])
        #expect(replies.first?.payload.prefix(4) == [0, 0, 0, 28])
        #expect(replies.last?.type == NBDChunkType.offsetHole.rawValue)
        #expect(channel.isActive)
    }

    /// Bytes that do not repeat at any short period, so a shifted or
    /// duplicated piece of a payload shows.
    func pattern(_ seed: Int, _ count: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 0x9E37_79B1 &+ seed &* 0x85EB_CA77) >> 13) }
    }

    @Test func readingPausesWhileTooManyRequestsAreInFlight() throws {
        try negotiate()
        driver.holdCompletions = true
        var burst = ByteBuffer()
        for cookie in 1...10 {
            var read = Wire.request(type: 0, cookie: UInt64(cookie), offset: 0, length: 512)
            burst.writeBuffer(&read)
        }
        try send(burst)
        #expect(driver.held.count == 4, "only maxInFlight requests start")
        while !driver.held.isEmpty {
            driver.release()
            loop.run()
        }
        #expect(chunks(try outbound()).count == 10, "the rest ran once the first finished")
    }

    @Test func flushAndDisconnectIgnoreHostileOffsets() throws {
        try negotiate()
        try send(Wire.request(type: 3, cookie: 1, offset: .max, length: .max))
        var reply = try outbound()
        #expect(reply.readInteger(as: UInt32.self) == NBDMagic.simpleReply)
        #expect(reply.readInteger(as: UInt32.self) == 0)
        try send(Wire.request(type: 2, cookie: 2, offset: .max, length: .max))
        #expect(!channel.isActive)
    }

    @Test func repliesWaitWhileTheClientIsNotReading() throws {
        try negotiate()
        channel.isWritable = false
        channel.pipeline.fireChannelWritabilityChanged()
        try send(Wire.request(type: 0, cookie: 1, offset: 0, length: 512))
        #expect(chunks(try outbound()).isEmpty, "nothing is started while the client does not read")
        channel.isWritable = true
        channel.pipeline.fireChannelWritabilityChanged()
        loop.run()
        #expect(chunks(try outbound()).count == 1)
    }

    /// Replies that completions write during a burst go out when it ends,
    /// not a loop turn later.
    @Test func repliesWrittenDuringABurstAreFlushedWhenItEnds() throws {
        try negotiate()
        driver.holdCompletions = true
        for cookie in 1...2 {
            try send(Wire.request(type: 0, cookie: UInt64(cookie), offset: 0, length: 512))
        }
        #expect(driver.held.count == 2)
        burst.run { driver.release() }
        #expect(chunks(try outbound()).map(\.cookie) == [1, 2], "flushed without running the loop")
        // Outside a burst, a task on the loop flushes.
        try send(Wire.request(type: 0, cookie: 3, offset: 0, length: 512))
        driver.release()
        #expect(chunks(try outbound()).isEmpty)
        loop.run()
        #expect(chunks(try outbound()).map(\.cookie) == [3])
    }

    /// Header-only replies finished together go out as one buffer, in the
    /// order they finished, and a data reply between them keeps its place.
    @Test func headerOnlyRepliesOfABurstShareOneBuffer() throws {
        try negotiate()
        driver.holdCompletions = true
        for cookie in 1...3 {
            try send(Wire.request(type: 1, cookie: UInt64(cookie), offset: 0, length: 4, payload: [1, 2, 3, 4]))
        }
        try send(Wire.request(type: 0, cookie: 4, offset: 0, length: 512))
        try send(Wire.request(type: 1, cookie: 5, offset: 0, length: 4, payload: [5, 6, 7, 8]))
        #expect(driver.held.count == 4, "maxInFlight")
        burst.run { while !driver.held.isEmpty { driver.release() } }
        loop.run()
        var buffers: [ByteBuffer] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { buffers.append(buffer) }
        #expect(buffers.first?.readableBytes == 3 * NBDReplyEncoder.simpleReplyHeaderSize, "three replies, one buffer")
        var all = ByteBuffer()
        for var buffer in buffers { all.writeBuffer(&buffer) }
        var cookies: [UInt64] = []
        while all.readableBytes > 0 {
            if all.readInteger(as: UInt32.self) == NBDMagic.simpleReply {
                _ = all.readInteger(as: UInt32.self)
                cookies.append(all.readInteger(as: UInt64.self)!)
            } else {
                _ = all.readInteger(as: UInt32.self)
                cookies.append(all.readInteger(as: UInt64.self)!)
                all.moveReaderIndex(forwardBy: Int(all.readInteger(as: UInt32.self)!))
            }
        }
        #expect(cookies == [1, 2, 3, 4, 5])
    }

    /// A READ into memory aligned for O_DIRECT goes out as one buffer: the
    /// header sits in room left before the data, which the node reads into
    /// without a bounce.
    @Test(arguments: [false, true])
    func anAlignedReadGoesOutAsOneBufferWithItsHeader(structured: Bool) throws {
        driver.memoryAlignment = 4096
        registry.export(named: "disk")!.backend.node!.refreshLimits()
        for index in 0..<8192 { driver.data[8192 + index] = UInt8(truncatingIfNeeded: index &* 7 &+ 3) }
        if structured {
            try negotiate()
        } else {
            _ = try outbound()
            var hello = ByteBuffer()
            hello.writeInteger(UInt32(3))
            var go = Wire.option(7, Wire.goPayload("disk"))
            hello.writeBuffer(&go)
            try send(hello)
            _ = try outbound()
        }
        driver.holdCompletions = true
        try send(Wire.request(type: 0, cookie: 9, offset: 8192, length: 8192))
        #expect(graph.bufferPool.taken == 0, "read in place, no bounce")
        driver.release()
        loop.run()
        var buffers: [ByteBuffer] = []
        while let part = try channel.readOutbound(as: ByteBuffer.self) { buffers.append(part) }
        #expect(buffers.count == 1)
        var reply = buffers.first ?? ByteBuffer()
        let expected = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        if structured {
            var header = ByteBuffer()
            header.writeMultipleIntegers(NBDMagic.structuredReply, UInt16(1), NBDChunkType.offsetData.rawValue,
                                         UInt64(9), UInt32(8 + 8192), UInt64(8192))
            #expect(reply.readBytes(length: 28) == header.readBytes(length: 28))
        } else {
            var header = ByteBuffer()
            header.writeMultipleIntegers(NBDMagic.simpleReply, UInt32(0), UInt64(9))
            #expect(reply.readBytes(length: 16) == header.readBytes(length: 16))
        }
        #expect(reply.readBytes(length: reply.readableBytes) == expected)
    }

    /// READs in flight are kept in records the connection reuses: as many
    /// as were ever in flight at once. Each reply goes out from the very
    /// buffer the disk read into, completed at once or later: handing the
    /// buffer through the record must not leave a second owner behind,
    /// which would make writing the header copy the whole buffer.
    @Test(arguments: [false, true])
    func readsReuseTheirRecordsAndReplyFromTheBufferReadInto(held: Bool) throws {
        try negotiate()
        for index in 0..<(5 * 4096) { driver.data[index] = UInt8(truncatingIfNeeded: index | 1) }  // data, not holes
        driver.holdCompletions = held
        for round in 0..<2 {
            driver.bufferAddresses = []
            var burst = ByteBuffer()
            for cookie in 1...4 {
                var read = Wire.request(type: 0, cookie: UInt64(cookie), offset: UInt64(cookie * 4096), length: 4096)
                burst.writeBuffer(&read)
            }
            try send(burst)
            if held {
                #expect(driver.held.count == 4 && handler.idleReads.isEmpty, "round \(round): all four records in use")
                driver.release()
                loop.run()
            }
            #expect(handler.idleReads.count == (held ? 4 : 1), "round \(round): no record made after the first round")
            var replies: [ByteBuffer] = []
            while let part = try channel.readOutbound(as: ByteBuffer.self) { replies.append(part) }
            #expect(replies.count == 4)
            let sent = replies.map { reply in reply.withUnsafeReadableBytes { Int(bitPattern: $0.baseAddress) + 28 } }
            #expect(sent == driver.bufferAddresses, "round \(round): replies sent from the buffers read into")
        }
    }

    /// READ and WRITE buffers start at the node's optimal alignment (the
    /// page, for O_DIRECT), not just at the alignment it requires, so a
    /// 4 KiB transfer is one page, one segment, for the device.
    @Test func transferBuffersStartAtTheOptimalAlignment() throws {
        driver.memoryAlignment = 512
        driver.optimalMemoryAlignment = 4096
        registry.export(named: "disk")!.backend.node!.refreshLimits()
        try negotiate()
        var stream = ByteBuffer()
        for cookie in 1...8 {
            var read = Wire.request(type: 0, cookie: UInt64(cookie), offset: UInt64(cookie * 4096), length: 4096)
            stream.writeBuffer(&read)
            var write = Wire.request(type: 1, cookie: UInt64(100 + cookie), offset: UInt64(65536 + cookie * 4096),
                                     length: 4096, payload: pattern(cookie, 4096))
            stream.writeBuffer(&write)
        }
        try send(stream)
        loop.run()
        #expect(driver.bufferAddresses.count == 16)
        #expect(driver.bufferAddresses.allSatisfy { $0 % 4096 == 0 }, "page offsets: \(driver.bufferAddresses.map { $0 % 4096 })")
    }
}
