/// One header extension: a type, and data kept byte for byte.
public struct QCOW2HeaderExtension: Equatable, Sendable {
    public static let end: UInt32 = 0
    public static let backingFormat: UInt32 = 0xe279_2aca
    public static let featureNames: UInt32 = 0x6803_f857
    public static let bitmaps: UInt32 = 0x2385_2875
    public static let fullDiskEncryption: UInt32 = 0x0537_be77
    public static let dataFile: UInt32 = 0x4441_5441

    public var type: UInt32
    public var data: [UInt8]

    public init(type: UInt32, data: [UInt8]) {
        self.type = type
        self.data = data
    }

    /// Parses extensions from `start` up to `limit` (where the backing file
    /// name starts, or the end of the header cluster), as QEMU reads them:
    /// the walk ends at an end marker or at `limit`, an extension running
    /// past `limit` is refused, a backing format name must fit in 15 bytes
    /// and a bitmaps extension must be 24 bytes long. Bytes past those read
    /// (a file shorter than its header cluster) read as zeroes.
    static func parseAll(_ bytes: [UInt8], from start: Int, to limit: Int) throws -> [QCOW2HeaderExtension] {
        var result: [QCOW2HeaderExtension] = []
        try parse(bytes, from: start, to: limit, into: &result)
        return result
    }

    /// The extensions before the first malformed one (QEMU reads the
    /// feature name table for its message before it judges the rest).
    static func parseLeniently(_ bytes: [UInt8], from start: Int, to limit: Int) -> [QCOW2HeaderExtension] {
        var result: [QCOW2HeaderExtension] = []
        try? parse(bytes, from: start, to: limit, into: &result)
        return result
    }

    private static func parse(_ bytes: [UInt8], from start: Int, to limit: Int,
                              into result: inout [QCOW2HeaderExtension]) throws {
        var offset = start
        let reader = BigEndianReader(bytes)
        while offset < limit {
            guard offset + 8 <= limit else { throw QCOW2Error("Header extension too large") }
            guard offset + 8 <= bytes.count else { return }  // zeroes: an end marker
            let type = reader.u32(at: offset)
            let length = Int(reader.u32(at: offset + 4))
            offset += 8
            guard length <= limit - offset else { throw QCOW2Error("Header extension too large") }
            if type == end { return }
            // QEMU keeps the name in a 16-byte C string and refuses a longer one.
            if type == backingFormat, length >= 16 {
                throw QCOW2Error("ERROR: ext_backing_format: len=\(length) too large (>=16)")
            }
            // Checked before anything else QEMU reads of it, stale or not.
            if type == bitmaps, length != 24 { throw QCOW2Error("bitmaps_ext: Invalid extension length") }
            let read = Array(bytes[min(offset, bytes.count)..<min(offset + length, bytes.count)])
            result.append(QCOW2HeaderExtension(type: type, data: read + [UInt8](repeating: 0, count: length - read.count)))
            offset += (length + 7) / 8 * 8
        }
    }
}
