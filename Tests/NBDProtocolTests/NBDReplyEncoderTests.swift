import NBDProtocol
import NIOCore
import Testing

/// Reply headers byte for byte, against the fields the protocol lists.
@Suite struct NBDReplyEncoderTests {
    func bytes(_ build: (inout ByteBuffer) -> Void) -> [UInt8] {
        var buffer = ByteBuffer()
        build(&buffer)
        return buffer.readBytes(length: buffer.readableBytes)!
    }

    @Test func headersCarryTheirFieldsBigEndianAndNothingElse() {
        let cookie: UInt64 = 0x0102_0304_0506_0708
        #expect(bytes { NBDReplyEncoder.writeSimpleReply(error: 5, cookie: cookie, into: &$0) }
                == bytes { $0.writeMultipleIntegers(UInt32(0x6744_6698), UInt32(5), cookie) })
        #expect(bytes { NBDReplyEncoder.writeChunkHeader(flags: .done, type: .none, cookie: cookie, length: 0, into: &$0) }
                == bytes { $0.writeMultipleIntegers(UInt32(0x668e_33ef), UInt16(1), UInt16(0), cookie, UInt32(0)) })
        #expect(bytes { NBDReplyEncoder.writeDataChunkHeader(done: false, cookie: cookie, offset: 1 << 40, dataLength: 4096,
                                                             into: &$0) }
                == bytes { $0.writeMultipleIntegers(UInt32(0x668e_33ef), UInt16(0), UInt16(1), cookie, UInt32(4104),
                                                    UInt64(1 << 40)) })
        #expect(bytes { NBDReplyEncoder.writeHoleChunk(done: true, cookie: cookie, offset: 512, length: 65536, into: &$0) }
                == bytes { $0.writeMultipleIntegers(UInt32(0x668e_33ef), UInt16(1), UInt16(2), cookie, UInt32(12),
                                                    UInt64(512), UInt32(65536)) })
        // Appended after what the buffer holds.
        #expect(bytes { $0.writeInteger(UInt8(0xaa)); NBDReplyEncoder.writeSimpleReply(error: 0, cookie: 1, into: &$0) }.count == 17)
    }
}
