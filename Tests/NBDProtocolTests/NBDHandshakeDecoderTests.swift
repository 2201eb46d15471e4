@testable import NBDProtocol
import NBDTestSupport
import NIOCore
import Testing

@Suite struct NBDHandshakeDecoderTests {
    /// Feeds `bytes` in pieces of `chunk` bytes and collects the messages.
    func decode(_ bytes: ByteBuffer, chunk: Int) throws -> [NBDHandshakeDecoder.Message] {
        var decoder = NBDHandshakeDecoder(maxOptionLength: 64)
        var accumulated = ByteBuffer()
        var input = bytes
        var messages: [NBDHandshakeDecoder.Message] = []
        while input.readableBytes > 0 {
            var piece = input.readSlice(length: min(chunk, input.readableBytes))!
            accumulated.writeBuffer(&piece)
            while let message = try decoder.next(&accumulated) { messages.append(message) }
        }
        return messages
    }

    @Test(arguments: [1, 3, 7, 1000])
    func parsesFlagsThenOptionsInAnyChunking(chunk: Int) throws {
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(3))
        var go = Wire.option(7, Wire.goPayload("disk", requests: [1, 3]))
        bytes.writeBuffer(&go)
        var structured = Wire.option(8)
        bytes.writeBuffer(&structured)
        let messages = try decode(bytes, chunk: chunk)
        #expect(messages == [
            .clientFlags([.fixedNewstyle, .noZeroes]),
            .option(.go(exportName: "disk", requests: [1, 3])),
            .option(.structuredReply),
        ])
    }

    @Test(arguments: [1, 5, 100])
    func oversizedOptionsAreSkippedNotBuffered(chunk: Int) throws {
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        var big = Wire.option(7, [UInt8](repeating: 0x41, count: 500))
        bytes.writeBuffer(&big)
        var list = Wire.option(3)
        bytes.writeBuffer(&list)
        let messages = try decode(bytes, chunk: chunk)
        #expect(messages == [.clientFlags(.fixedNewstyle), .option(.tooBig(code: 7)), .option(.list)])
    }

    @Test func badOptionMagicIsAnError() {
        var decoder = NBDHandshakeDecoder()
        var bytes = ByteBuffer()
        bytes.writeInteger(UInt32(1))
        bytes.writeInteger(UInt64(0x1234))
        bytes.writeInteger(UInt64(0))
        _ = try? decoder.next(&bytes)
        #expect(throws: NBDHandshakeDecoder.DecodingError.self) { try decoder.next(&bytes) }
    }

    @Test func malformedPayloadsBecomeInvalid() {
        // Name length runs past the option.
        var payload = ByteBuffer()
        payload.writeInteger(UInt32(100))
        payload.writeBytes([1, 2, 3])
        #expect(NBDOptionRequest(code: 7, payload: payload).isInvalid)
        // LIST carries no payload.
        #expect(NBDOptionRequest(code: 3, payload: ByteBuffer(bytes: [1])).isInvalid)
        // A huge query count with no bytes behind it is refused before allocating.
        var meta = ByteBuffer(bytes: Wire.string("disk"))
        meta.writeInteger(UInt32.max)
        #expect(NBDOptionRequest(code: 10, payload: meta).isInvalid)
        // Names over 4096 bytes.
        let long = ByteBuffer(bytes: Wire.goPayload(String(repeating: "x", count: 5000)))
        #expect(NBDOptionRequest(code: 7, payload: long).isInvalid)
        // Unknown and TLS options are unsupported, not invalid.
        #expect(NBDOptionRequest(code: 0x4242, payload: ByteBuffer()) == .unsupported(code: 0x4242))
        #expect(NBDOptionRequest(code: 5, payload: ByteBuffer()) == .unsupported(code: 5))
    }
}

extension NBDOptionRequest {
    var isInvalid: Bool {
        if case .invalid = self { return true }
        return false
    }
}
