import NBDProtocol
import NIOCore

/// Builds client-side NBD bytes, and parses option replies, for tests of
/// the protocol and the server.
public enum Wire {
    public static func option(_ code: UInt32, _ payload: [UInt8] = []) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(code)
        buffer.writeInteger(UInt32(payload.count))
        buffer.writeBytes(payload)
        return buffer
    }

    public static func string(_ text: String) -> [UInt8] {
        let bytes = Array(text.utf8)
        return withUnsafeBytes(of: UInt32(bytes.count).bigEndian, Array.init) + bytes
    }

    public static func goPayload(_ name: String, requests: [UInt16] = []) -> [UInt8] {
        var bytes = string(name)
        bytes += withUnsafeBytes(of: UInt16(requests.count).bigEndian, Array.init)
        for request in requests { bytes += withUnsafeBytes(of: request.bigEndian, Array.init) }
        return bytes
    }

    public static func metaPayload(_ name: String, queries: [String]) -> [UInt8] {
        var bytes = string(name)
        bytes += withUnsafeBytes(of: UInt32(queries.count).bigEndian, Array.init)
        for query in queries { bytes += string(query) }
        return bytes
    }

    public static func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64 = 1, offset: UInt64 = 0,
                        length: UInt32 = 0, payload: [UInt8] = [], magic: UInt32 = NBDMagic.request) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(magic)
        buffer.writeInteger(flags)
        buffer.writeInteger(type)
        buffer.writeInteger(cookie)
        buffer.writeInteger(offset)
        buffer.writeInteger(length)
        buffer.writeBytes(payload)
        return buffer
    }

    /// Option replies parsed back: (option, type, payload).
    public static func replies(_ buffer: ByteBuffer) -> [(UInt32, UInt32, [UInt8])] {
        var buffer = buffer
        var result: [(UInt32, UInt32, [UInt8])] = []
        while buffer.readableBytes >= 20 {
            _ = buffer.readInteger(as: UInt64.self)
            let option = buffer.readInteger(as: UInt32.self)!
            let type = buffer.readInteger(as: UInt32.self)!
            let length = buffer.readInteger(as: UInt32.self)!
            result.append((option, type, buffer.readBytes(length: Int(length)) ?? []))
        }
        return result
    }
}
