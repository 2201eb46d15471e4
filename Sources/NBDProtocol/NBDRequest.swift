import NIOCore

/// One transmission-phase request as read off the wire.
public struct NBDRequest: Sendable {
    /// The raw command number; `command` is nil for numbers Strata does not know.
    public var type: UInt16
    public var flags: NBDCommandFlags
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// The data of a WRITE; nil for other commands and for a WRITE whose
    /// payload was too large to accept (it was skipped, see `payloadDiscarded`).
    public var payload: ByteBuffer?
    /// True for a WRITE longer than the maximum payload: its data was read
    /// and thrown away so the connection stays in sync; answer it with an error.
    public var payloadDiscarded: Bool

    public var command: NBDCommand? { NBDCommand(rawValue: type) }

    public init(type: UInt16, flags: NBDCommandFlags, cookie: UInt64, offset: UInt64, length: UInt32,
                payload: ByteBuffer? = nil, payloadDiscarded: Bool = false) {
        self.type = type
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.payloadDiscarded = payloadDiscarded
    }
}

/// Parses transmission-phase requests from the connection's bytes.
///
/// Pure: feed it the accumulated buffer, get whole requests or nil for "need
/// more". A WRITE's payload is returned as a slice of the buffer (no copy). A
/// WRITE longer than `maxPayload` has its payload skipped as it arrives,
/// without buffering it.
public struct NBDRequestDecoder: Sendable {
    public enum DecodingError: Error, Equatable, Sendable {
        /// A request did not start with the request magic: the stream is lost.
        case badMagic(UInt32)
    }

    public static let headerSize = 28

    private var skipping: (request: NBDRequest, remaining: Int)?
    public let maxPayload: Int

    public init(maxPayload: Int = NBDLimits.maxPayload) {
        self.maxPayload = maxPayload
    }

    public mutating func next(_ buffer: inout ByteBuffer) throws -> NBDRequest? {
        if let (request, remaining) = skipping {
            let skip = min(remaining, buffer.readableBytes)
            buffer.moveReaderIndex(forwardBy: skip)
            if skip < remaining {
                skipping = (request, remaining - skip)
                return nil
            }
            skipping = nil
            return request
        }
        guard buffer.readableBytes >= Self.headerSize else { return nil }
        let index = buffer.readerIndex
        let magic = buffer.getInteger(at: index, as: UInt32.self)!
        guard magic == NBDMagic.request else { throw DecodingError.badMagic(magic) }
        let flags = buffer.getInteger(at: index + 4, as: UInt16.self)!
        let type = buffer.getInteger(at: index + 6, as: UInt16.self)!
        let cookie = buffer.getInteger(at: index + 8, as: UInt64.self)!
        let offset = buffer.getInteger(at: index + 16, as: UInt64.self)!
        let length = buffer.getInteger(at: index + 24, as: UInt32.self)!
        var request = NBDRequest(type: type, flags: NBDCommandFlags(rawValue: flags),
                                 cookie: cookie, offset: offset, length: length)
        guard type == NBDCommand.write.rawValue else {
            buffer.moveReaderIndex(forwardBy: Self.headerSize)
            return request
        }
        if Int(length) > maxPayload {
            buffer.moveReaderIndex(forwardBy: Self.headerSize)
            request.payloadDiscarded = true
            skipping = (request, Int(length))
            return try next(&buffer)
        }
        guard buffer.readableBytes >= Self.headerSize + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: Self.headerSize)
        request.payload = buffer.readSlice(length: Int(length))
        return request
    }

    /// Bytes still needed to complete the request at the front of `buffer`,
    /// so the reader can size its next read; 0 when unknown.
    public func bytesWanted(_ buffer: ByteBuffer) -> Int {
        guard skipping == nil, buffer.readableBytes >= Self.headerSize else { return 0 }
        let index = buffer.readerIndex
        guard buffer.getInteger(at: index + 6, as: UInt16.self) == NBDCommand.write.rawValue,
              let length = buffer.getInteger(at: index + 24, as: UInt32.self),
              Int(length) <= maxPayload else { return 0 }
        return Self.headerSize + Int(length) - buffer.readableBytes
    }
}
