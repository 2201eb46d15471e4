import NIOCore

/// Parses what a client sends during negotiation: its flags, then options.
///
/// A pure parser: feed it the connection's accumulated bytes; it consumes
/// whole messages and returns nil when it needs more. Options longer than
/// `NBDLimits.maxOptionLength` are skipped as their bytes arrive, never
/// buffered, and reported as `.tooBig`.
public struct NBDHandshakeDecoder: Sendable {
    public enum Message: Equatable, Sendable {
        case clientFlags(NBDClientFlags)
        case option(NBDOptionRequest)
    }

    public enum DecodingError: Error, Equatable, Sendable {
        /// An option did not start with IHAVEOPT: the stream cannot be resynchronised.
        case badOptionMagic(UInt64)
    }

    private enum Phase: Sendable {
        case clientFlags
        case optionHeader
        case skipping(code: UInt32, remaining: Int)
    }

    private var phase: Phase = .clientFlags
    public let maxOptionLength: Int

    public init(maxOptionLength: Int = NBDLimits.maxOptionLength) {
        self.maxOptionLength = maxOptionLength
    }

    public mutating func next(_ buffer: inout ByteBuffer) throws -> Message? {
        switch phase {
        case .clientFlags:
            guard let flags = buffer.readInteger(as: UInt32.self) else { return nil }
            phase = .optionHeader
            return .clientFlags(NBDClientFlags(rawValue: flags))

        case .optionHeader:
            guard buffer.readableBytes >= 16 else { return nil }
            let index = buffer.readerIndex
            let magic = buffer.getInteger(at: index, as: UInt64.self)!
            guard magic == NBDMagic.option else { throw DecodingError.badOptionMagic(magic) }
            let code = buffer.getInteger(at: index + 8, as: UInt32.self)!
            let length = Int(buffer.getInteger(at: index + 12, as: UInt32.self)!)
            if length > maxOptionLength {
                buffer.moveReaderIndex(forwardBy: 16)
                phase = .skipping(code: code, remaining: length)
                return try next(&buffer)
            }
            guard buffer.readableBytes >= 16 + length else { return nil }
            buffer.moveReaderIndex(forwardBy: 16)
            let payload = buffer.readSlice(length: length)!
            return .option(NBDOptionRequest(code: code, payload: payload))

        case .skipping(let code, let remaining):
            let skip = min(remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: skip)
            if skip < remaining {
                phase = .skipping(code: code, remaining: remaining - skip)
                return nil
            }
            phase = .optionHeader
            return .option(.tooBig(code: code))
        }
    }
}
