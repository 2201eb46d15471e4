import NIOCore

/// Writes the server's side of the wire format into ByteBuffers.
public enum NBDReplyEncoder {
    /// Size of a simple reply header.
    public static let simpleReplyHeaderSize = 16
    /// Size of a structured reply chunk header.
    public static let chunkHeaderSize = 20
    /// Size of what precedes the data of an NBD_REPLY_TYPE_OFFSET_DATA chunk.
    public static let dataChunkHeaderSize = chunkHeaderSize + 8

    public static func writeGreeting(flags: NBDHandshakeFlags, into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.greeting)
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(flags.rawValue)
    }

    public static func writeOptionReply(
        option: UInt32, type: NBDOptionReplyType, payloadLength: Int, into buffer: inout ByteBuffer
    ) {
        buffer.writeInteger(NBDMagic.optionReply)
        buffer.writeInteger(option)
        buffer.writeInteger(type.rawValue)
        buffer.writeInteger(UInt32(payloadLength))
    }

    /// An option error reply with a human-readable message.
    public static func writeOptionError(
        option: UInt32, type: NBDOptionReplyType, message: String, into buffer: inout ByteBuffer
    ) {
        let text = Array(message.utf8.prefix(NBDLimits.maxString))
        writeOptionReply(option: option, type: type, payloadLength: text.count, into: &buffer)
        buffer.writeBytes(text)
    }

    // Every reply pays for its header, so headers are stored straight into
    // the buffer's memory (`ReplyHeaderWriter`): one capacity check per
    // header, not one per field.

    public static func writeSimpleReply(error: UInt32, cookie: UInt64, into buffer: inout ByteBuffer) {
        ReplyHeaderWriter.write(simpleReplyHeaderSize, into: &buffer) { header in
            header.put(NBDMagic.simpleReply)
            header.put(error)
            header.put(cookie)
        }
    }

    public static func writeChunkHeader(
        flags: NBDChunkFlags, type: NBDChunkType, cookie: UInt64, length: Int, into buffer: inout ByteBuffer
    ) {
        ReplyHeaderWriter.write(chunkHeaderSize, into: &buffer) { header in
            header.putChunkHeader(flags: flags, type: type, cookie: cookie, length: length)
        }
    }

    /// NBD_REPLY_TYPE_ERROR with the DONE flag, ending a structured reply.
    public static func writeErrorChunk(
        error: NBDError, message: String, cookie: UInt64, into buffer: inout ByteBuffer
    ) {
        let text = Array(message.utf8.prefix(NBDLimits.maxString))
        writeChunkHeader(flags: .done, type: .error, cookie: cookie, length: 6 + text.count, into: &buffer)
        buffer.writeInteger(error.rawValue)
        buffer.writeInteger(UInt16(text.count))
        buffer.writeBytes(text)
    }

    /// Header of an OFFSET_DATA chunk; `dataLength` bytes of data follow.
    public static func writeDataChunkHeader(
        done: Bool, cookie: UInt64, offset: UInt64, dataLength: Int, into buffer: inout ByteBuffer
    ) {
        ReplyHeaderWriter.write(dataChunkHeaderSize, into: &buffer) { header in
            header.putChunkHeader(flags: done ? .done : [], type: .offsetData, cookie: cookie, length: 8 + dataLength)
            header.put(offset)
        }
    }

    public static func writeHoleChunk(
        done: Bool, cookie: UInt64, offset: UInt64, length: UInt32, into buffer: inout ByteBuffer
    ) {
        ReplyHeaderWriter.write(chunkHeaderSize + 12, into: &buffer) { header in
            header.putChunkHeader(flags: done ? .done : [], type: .offsetHole, cookie: cookie, length: 12)
            header.put(offset)
            header.put(length)
        }
    }

    public static func writeNoneChunk(cookie: UInt64, into buffer: inout ByteBuffer) {
        writeChunkHeader(flags: .done, type: .none, cookie: cookie, length: 0, into: &buffer)
    }

    /// A BLOCK_STATUS chunk: context id, then (length, flags) pairs.
    public static func writeBlockStatusChunk(
        done: Bool, cookie: UInt64, contextID: UInt32, extents: [(length: UInt32, flags: UInt32)],
        into buffer: inout ByteBuffer
    ) {
        writeChunkHeader(flags: done ? .done : [], type: .blockStatus, cookie: cookie,
                         length: 4 + 8 * extents.count, into: &buffer)
        buffer.writeInteger(contextID)
        for extent in extents {
            buffer.writeInteger(extent.length)
            buffer.writeInteger(extent.flags)
        }
    }
}
