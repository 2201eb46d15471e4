import NIOCore

/// One transmission-phase request as read off the wire.
public struct NBDRequest: Sendable {
    /// The raw command number; `command` is nil for numbers Strata does not know.
    public var type: UInt16
    public var flags: NBDCommandFlags
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// The data of a WRITE; nil for other commands, for a WRITE whose
    /// payload was too large to accept (it was skipped, see
    /// `payloadDiscarded`) and for one whose payload follows (see
    /// `payloadFollows`).
    public var payload: ByteBuffer?
    /// True for a WRITE longer than the maximum payload: its data was read
    /// and thrown away so the connection stays in sync; answer it with an error.
    public var payloadDiscarded: Bool
    /// True for a WRITE at least `NBDRequestDecoder.streamingThreshold`
    /// long: the decoder read only its header, and the caller takes the
    /// payload with `NBDRequestDecoder.takePayload` before the next request.
    public var payloadFollows = false

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
/// more". A short WRITE's payload is returned as a slice of the buffer (no
/// copy). A long one is left for the caller to move into memory of its own
/// as it arrives (`takePayload`): a slice would pin the buffer, so every
/// later read appended to it would copy the whole buffer, and an O_DIRECT
/// write would copy the slice once more into aligned memory. A WRITE longer
/// than `maxPayload` has its payload skipped as it arrives, without
/// buffering it.
public struct NBDRequestDecoder: Sendable {
    public enum DecodingError: Error, Equatable, Sendable {
        /// A request did not start with the request magic: the stream is lost.
        case badMagic(UInt32)
    }

    public static let headerSize = 28

    private var skipping: (request: NBDRequest, remaining: Int)?
    public let maxPayload: Int
    /// WRITE payloads at least this long follow their request (see
    /// `NBDRequest.payloadFollows`); shorter ones are slices.
    public let streamingThreshold: Int
    /// Bytes of a following payload not taken yet.
    public private(set) var payloadRemaining = 0

    public init(maxPayload: Int = NBDLimits.maxPayload, streamingThreshold: Int = .max) {
        self.maxPayload = maxPayload
        self.streamingThreshold = max(1, streamingThreshold)
    }

    public mutating func next(_ buffer: inout ByteBuffer) throws -> NBDRequest? {
        precondition(payloadRemaining == 0, "the payload of the last WRITE must be taken first")
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
        if Int(length) >= streamingThreshold {
            buffer.moveReaderIndex(forwardBy: Self.headerSize)
            request.payloadFollows = true
            payloadRemaining = Int(length)
            return request
        }
        guard buffer.readableBytes >= Self.headerSize + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: Self.headerSize)
        request.payload = buffer.readSlice(length: Int(length))
        return request
    }

    /// Moves what `buffer` holds of the following payload to the end of
    /// `sink`, or past it when `sink` is nil (a request refused anyway);
    /// true once the whole payload has been taken. `sink` should have room
    /// for it all, or it is reallocated (and moved) as it grows.
    public mutating func takePayload(from buffer: inout ByteBuffer, into sink: inout ByteBuffer?) -> Bool {
        let count = min(payloadRemaining, buffer.readableBytes)
        if sink == nil {
            buffer.moveReaderIndex(forwardBy: count)
        } else {
            buffer.readWithUnsafeReadableBytes { source in
                sink!.writeBytes(UnsafeRawBufferPointer(rebasing: source[..<count]))
                return count
            }
        }
        payloadRemaining -= count
        return payloadRemaining == 0
    }
}
