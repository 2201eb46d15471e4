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

    /// Parses extensions from `start` to the end marker; each must fit in
    /// the header cluster, and a backing format name in 15 bytes.
    static func parseAll(_ bytes: [UInt8], from start: Int, clusterSize: Int) throws -> [QCOW2HeaderExtension] {
        let limit = min(bytes.count, clusterSize)
        var offset = start
        var result: [QCOW2HeaderExtension] = []
        let reader = BigEndianReader(bytes)
        while offset + 8 <= limit {
            let type = reader.u32(at: offset)
            let length = Int(reader.u32(at: offset + 4))
            if type == end { return result }
            guard length <= limit - offset - 8 else {
                throw QCOW2Error("Header extension 0x\(String(type, radix: 16)) runs past the header cluster")
            }
            // QEMU keeps the name in a 16-byte C string and refuses a longer one.
            if type == backingFormat, length >= 16 {
                throw QCOW2Error("ERROR: ext_backing_format: len=\(length) too large (>=16)")
            }
            result.append(QCOW2HeaderExtension(type: type, data: Array(bytes[offset + 8..<offset + 8 + length])))
            offset += 8 + (length + 7) / 8 * 8
        }
        // Ran off the cluster without an end marker: what was read stands.
        return result
    }
}
