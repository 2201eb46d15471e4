@testable import NBDProtocol
import NBDTestSupport
import NIOCore
import Testing

@Suite struct NBDRequestDecoderTests {
    /// Feeds `input` in pieces of `chunk` bytes; payloads that follow
    /// their request are taken into buffers of their own, as the server does,
    /// or skipped for the cookies in `skipping`.
    func decodeAll(_ input: ByteBuffer, chunk: Int, maxPayload: Int = 1024,
                   streamingThreshold: Int = .max, skipping: Set<UInt64> = []) throws -> [NBDRequest] {
        var decoder = NBDRequestDecoder(maxPayload: maxPayload, streamingThreshold: streamingThreshold)
        var accumulated = ByteBuffer()
        var input = input
        var requests: [NBDRequest] = []
        var following: (NBDRequest, ByteBuffer?)?
        while input.readableBytes > 0 {
            var piece = input.readSlice(length: min(chunk, input.readableBytes))!
            accumulated.writeBuffer(&piece)
            while true {
                if var pending = following {
                    guard decoder.takePayload(from: &accumulated, into: &pending.1) else {
                        following = pending
                        break
                    }
                    following = nil
                    pending.0.payload = pending.1
                    requests.append(pending.0)
                } else if let request = try decoder.next(&accumulated) {
                    if request.payloadFollows {
                        following = (request, skipping.contains(request.cookie) ? nil : ByteBuffer())
                    } else {
                        requests.append(request)
                    }
                } else {
                    break
                }
            }
        }
        #expect(following == nil && decoder.payloadRemaining == 0)
        return requests
    }

    @Test(arguments: [1, 13, 28, 4096])
    func readsRequestsAndWritePayloadsInAnyChunking(chunk: Int) throws {
        var bytes = Wire.request(type: 0, cookie: 7, offset: 4096, length: 512)
        var write = Wire.request(type: 1, flags: 1, cookie: 8, offset: 0, length: 5, payload: [1, 2, 3, 4, 5])
        bytes.writeBuffer(&write)
        var flush = Wire.request(type: 3, cookie: 9)
        bytes.writeBuffer(&flush)
        let requests = try decodeAll(bytes, chunk: chunk)
        #expect(requests.map(\.cookie) == [7, 8, 9])
        #expect(requests[0].command == .read)
        #expect(requests[0].length == 512)
        #expect(requests[1].flags == .fua)
        #expect(requests[1].payload.map { Array($0.readableBytesView) } == [1, 2, 3, 4, 5])
        #expect(requests[2].command == .flush)
    }

    @Test(arguments: [1, 13, 28, 999, 4096])
    func longPayloadsFollowTheirRequestInAnyChunking(chunk: Int) throws {
        var bytes = ByteBuffer()
        for (cookie, length) in [(1, 600), (2, 599), (3, 1024), (4, 0)] {
            var write = Wire.request(type: 1, cookie: UInt64(cookie), length: UInt32(length),
                                     payload: (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ cookie) })
            bytes.writeBuffer(&write)
        }
        var oversized = Wire.request(type: 1, cookie: 5, length: 3000, payload: [UInt8](repeating: 9, count: 3000))
        bytes.writeBuffer(&oversized)
        var read = Wire.request(type: 0, cookie: 6, length: 10)
        bytes.writeBuffer(&read)
        let requests = try decodeAll(bytes, chunk: chunk, streamingThreshold: 600)
        #expect(requests.map(\.cookie) == [1, 2, 3, 4, 5, 6])
        #expect(requests.map(\.payloadFollows) == [true, false, true, false, false, false])
        for request in requests.prefix(4) {
            let expected = (0..<Int(request.length)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(request.cookie)) }
            #expect(request.payload.map { Array($0.readableBytesView) } == expected)
        }
        #expect(requests[4].payloadDiscarded && requests[4].payload == nil)
        #expect(requests[5].command == .read)
    }

    @Test(arguments: [1, 700, 4096])
    func aFollowingPayloadCanBeSkippedWithoutABuffer(chunk: Int) throws {
        var bytes = Wire.request(type: 1, cookie: 1, length: 900, payload: [UInt8](repeating: 7, count: 900))
        var read = Wire.request(type: 0, cookie: 2, length: 10)
        bytes.writeBuffer(&read)
        let requests = try decodeAll(bytes, chunk: chunk, streamingThreshold: 600, skipping: [1])
        #expect(requests.map(\.cookie) == [1, 2])
        #expect(requests[0].payloadFollows && requests[0].payload == nil)
        #expect(requests[1].command == .read && requests[1].offset == 0)
    }

    @Test(arguments: [1, 100, 10000])
    func oversizedWritesAreSkippedAndTheStreamStaysInSync(chunk: Int) throws {
        var bytes = Wire.request(type: 1, cookie: 1, length: 3000, payload: [UInt8](repeating: 9, count: 3000))
        var read = Wire.request(type: 0, cookie: 2, length: 10)
        bytes.writeBuffer(&read)
        let requests = try decodeAll(bytes, chunk: chunk)
        #expect(requests.count == 2)
        #expect(requests[0].payloadDiscarded)
        #expect(requests[0].payload == nil)
        #expect(requests[1].cookie == 2)
    }

    @Test func badMagicThrows() {
        var decoder = NBDRequestDecoder()
        var bytes = Wire.request(type: 0, magic: 0xdead_beef)
        #expect(throws: NBDRequestDecoder.DecodingError.badMagic(0xdead_beef)) { try decoder.next(&bytes) }
    }
}

@Suite struct NBDRequestValidationTests {
    func session(readOnly: Bool = false, structured: Bool = true, contexts: Bool = true) -> NBDSession {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendCache]
        if structured { flags.insert(.sendDF) }
        if readOnly { flags.insert(.readOnly) }
        let export = NBDExportDescriptor(name: "", size: 1 << 20, transmissionFlags: flags)
        return NBDSession(export: export, structuredReplies: structured,
                          metaContexts: contexts ? [NBDMetaContext(id: 0, name: "base:allocation")] : [],
                          transmissionFlags: flags)
    }

    func check(_ type: UInt16, flags: NBDCommandFlags = [], offset: UInt64 = 0, length: UInt32 = 512,
               session: NBDSession) -> NBDError? {
        let payload = type == NBDCommand.write.rawValue ? ByteBuffer(repeating: 0, count: Int(length)) : nil
        return NBDRequestValidation.check(NBDRequest(type: type, flags: flags, cookie: 1, offset: offset, length: length,
                                                     payload: payload), session: session)?.error
    }

    @Test func boundsGiveEinvalForReadsAndEnospcForWrites() {
        let s = session()
        #expect(check(0, offset: (1 << 20) - 100, session: s) == .einval)
        #expect(check(1, offset: (1 << 20) - 100, session: s) == .enospc)
        #expect(check(6, offset: 1 << 21, session: s) == .enospc)
        #expect(check(4, offset: UInt64.max - 10, session: s) == .einval)
        #expect(check(0, offset: (1 << 20) - 512, session: s) == nil)
    }

    @Test func flagsMustBeValidAndAdvertised() {
        let s = session()
        #expect(check(0, flags: .reqOne, session: s) == .einval)
        #expect(check(0, flags: .dontFragment, session: s) == nil)
        #expect(check(0, flags: .dontFragment, session: session(structured: false)) == .einval)
        #expect(check(6, flags: .fastZero, session: s) == .einval, "FAST_ZERO was not advertised here")
        #expect(check(6, flags: [.noHole, .fua], session: s) == nil)
        #expect(check(1, flags: NBDCommandFlags(rawValue: 1 << 10), session: s) == .einval)
        #expect(check(0, flags: .fua, session: s) == nil, "FUA is tolerated on every command")
        #expect(check(42, session: s) == .einval)
    }

    /// DISC is never answered, so it is never refused: any flags, offset
    /// and length still end the connection, as with qemu-nbd.
    @Test func disconnectIsAcceptedWhateverItCarries() {
        #expect(check(2, flags: NBDCommandFlags(rawValue: 0x40), session: session()) == nil)
        #expect(check(2, flags: [.reqOne, .fastZero], offset: UInt64.max, length: .max, session: session()) == nil)
        #expect(check(2, flags: .fua, session: session(readOnly: true)) == nil)
    }

    @Test func aWriteWhosePayloadFollowsIsCheckedByItsHeader() {
        var request = NBDRequest(type: 1, flags: [], cookie: 1, offset: 0, length: 100_000)
        request.payloadFollows = true
        #expect(NBDRequestValidation.check(request, session: session()) == nil)
        #expect(NBDRequestValidation.check(request, session: session(readOnly: true))?.error == .eperm)
        request.offset = (1 << 20) - 4096
        #expect(NBDRequestValidation.check(request, session: session())?.error == .enospc)
        request.payloadFollows = false
        request.offset = 0
        #expect(NBDRequestValidation.check(request, session: session())?.error == .einval, "no payload at all")
    }

    @Test func discardedPayloadsAreRefused() {
        let request = NBDRequest(type: 1, flags: [], cookie: 1, offset: 0, length: 64 << 20, payloadDiscarded: true)
        #expect(NBDRequestValidation.check(request, session: session())?.error == .einval)
    }

    @Test func readOnlyContextsAndSizes() {
        #expect(check(1, session: session(readOnly: true)) == .eperm)
        #expect(check(4, session: session(readOnly: true)) == .eperm)
        #expect(check(7, session: session(contexts: false)) == .einval)
        #expect(check(7, length: 0, session: session()) == .einval)
        #expect(check(0, length: 33 << 20, session: session()) == .einval)
    }
}
