/// An internal snapshot from the snapshot table.
public struct QCOW2Snapshot: Equatable, Sendable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize: UInt64
    /// The guest size when the snapshot was taken, when recorded.
    public var diskSize: UInt64?
    /// The VM's instruction count at the snapshot, when recorded (QEMU
    /// writes all ones for none).
    public var icount: UInt64?
    /// The length of the entry's extra data. Version 3 asks for at least
    /// 16 bytes (the large VM state size and the disk size); QEMU before
    /// 4.2 wrote none, and `qemu-img check` calls such entries incomplete.
    public var extraDataSize = 0
    /// Extra data past the fields QEMU knows (24 bytes), kept when the
    /// table is written again.
    public var unknownExtraData: [UInt8] = []
    /// The id and name as stored, written back byte for byte (`id` and
    /// `name` replace bytes that are not UTF-8); nil for a new snapshot.
    var storedID: [UInt8]?
    var storedName: [UInt8]?

    /// Parses `count` entries; each is 40 bytes, extra data, id and name,
    /// padded to 8. Throws if an entry runs past `bytes`.
    public static func parseTable(_ bytes: [UInt8], count: Int) throws -> [QCOW2Snapshot] {
        try parseTableAndLength(bytes, count: count).snapshots
    }

    /// An entry whose extra data was cut to QEMU's limit (1024 bytes) as it
    /// was read, for `check -r all`.
    public struct DroppedExtraData: Equatable, Sendable {
        /// The entry's index in the table.
        public var entry: Int
        /// The extra data's length as the entry gave it.
        public var size: Int
    }

    /// The most extra data an entry may have (QEMU's limit).
    public static let maxExtraData = 1024
    /// How the error for an entry with more extra data starts (the entry's
    /// index follows), for `check` to report it as qemu-img does.
    public static let tooMuchExtraData = "Too much extra metadata in snapshot table entry"
    /// The error for a table past QEMU's limit on its size.
    public static let tableTooLarge = "Snapshot table exceeds the maximum size"

    /// As `parseTable`, with the table's length in bytes.
    ///
    /// For `qemu-img check`, QEMU reads the table as a check reads it:
    /// `zeroFilled` reads what lies past `bytes` (the end of the file) as
    /// zeroes, up to QEMU's limit on the table's size, and `dropExcessExtraData`
    /// (`-r all`) cuts an entry's extra data to 1024 bytes instead of
    /// refusing the table, each cut in `dropped`.
    public static func parseTableAndLength(_ bytes: [UInt8], count: Int, zeroFilled: Bool = false,
                                           dropExcessExtraData: Bool = false) throws
        -> (snapshots: [QCOW2Snapshot], length: Int, dropped: [DroppedExtraData]) {
        var bytes = bytes
        var offset = 0
        var snapshots: [QCOW2Snapshot] = []
        var dropped: [DroppedExtraData] = []
        /// Whether `end` bytes can be read, zeroes past the file's end
        /// included (`bytes` holds the file up to the table's limit).
        func readable(to end: Int) -> Bool {
            if end <= bytes.count { return true }
            guard zeroFilled else { return false }
            bytes += [UInt8](repeating: 0, count: end - bytes.count)
            return true
        }
        for index in 0..<count {
            guard offset <= maxTableBytes else { throw QCOW2Error(tableTooLarge) }
            guard readable(to: offset + 40) else { throw QCOW2Error("Snapshot table truncated") }
            // Read straight from `bytes`: a reader holding it while `readable`
            // grows it would copy the whole table each time.
            let field = { (at: Int, width: Int) in (at..<at + width).reduce(0) { $0 << 8 | Int(bytes[$1]) } }
            let idSize = field(offset + 12, 2)
            let nameSize = field(offset + 14, 2)
            let storedExtraSize = field(offset + 36, 4)
            var extraSize = storedExtraSize
            if extraSize > maxExtraData {
                guard dropExcessExtraData else {
                    throw QCOW2Error("\(tooMuchExtraData) \(index)")
                }
                dropped.append(DroppedExtraData(entry: index, size: storedExtraSize))
                extraSize = maxExtraData
            }
            // The id and name follow the extra data as stored, kept or not.
            let idStart = offset + 40 + storedExtraSize
            let end = idStart + idSize + nameSize
            // Past the limit nothing is read: extra data may claim 4 GiB.
            guard end <= maxTableBytes else { throw QCOW2Error(tableTooLarge) }
            guard readable(to: end) else { throw QCOW2Error("Snapshot table entry runs past the table") }
            let reader = BigEndianReader(bytes)
            var snapshot = QCOW2Snapshot(
                l1TableOffset: reader.u64(at: offset), l1Size: reader.u32(at: offset + 8),
                // C strings to QEMU: up to the first zero byte.
                id: String(decoding: bytes[idStart..<(idStart + idSize)].prefix { $0 != 0 }, as: UTF8.self),
                name: String(decoding: bytes[(idStart + idSize)..<end].prefix { $0 != 0 }, as: UTF8.self),
                dateSeconds: reader.u32(at: offset + 16), dateNanoseconds: reader.u32(at: offset + 20),
                vmClockNanoseconds: reader.u64(at: offset + 24), vmStateSize: UInt64(reader.u32(at: offset + 32)))
            guard snapshot.l1TableOffset < QCOW2Header.maxSize, snapshot.l1TableOffset % 512 == 0,
                  UInt64(snapshot.l1Size) * 8 <= QCOW2Header.maxL1Bytes else {
                throw QCOW2Error("Snapshot L1 table offset or size invalid")
            }
            if extraSize >= 8 { snapshot.vmStateSize = reader.u64(at: offset + 40) }
            if extraSize >= 16 { snapshot.diskSize = reader.u64(at: offset + 48) }
            if extraSize >= 24, case let icount = reader.u64(at: offset + 56), icount != .max { snapshot.icount = icount }
            snapshot.extraDataSize = extraSize
            snapshot.storedID = Array(bytes[idStart..<(idStart + idSize)])
            snapshot.storedName = Array(bytes[(idStart + idSize)..<end])
            if extraSize > Self.knownExtraData {
                snapshot.unknownExtraData = Array(bytes[(offset + 40 + Self.knownExtraData)..<(offset + 40 + extraSize)])
            }
            snapshots.append(snapshot)
            offset = (end + 7) / 8 * 8
        }
        return (snapshots, offset, dropped)
    }

    /// The extra data QEMU knows: the large VM state size, the disk size
    /// and the instruction count, 8 bytes each.
    static let knownExtraData = 24

    /// The table as QEMU writes it: every entry with the full known extra
    /// data (all ones for an unknown instruction count, `guestSize` for an
    /// unknown disk size) and its unknown extra data after it, padded to 8.
    public static func serializeTable(_ snapshots: [QCOW2Snapshot], guestSize: UInt64) -> [UInt8] {
        var bytes: [UInt8] = []
        func put(_ value: UInt64, _ width: Int) {
            for index in (0..<width).reversed() { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(8 * index))) }
        }
        for snapshot in snapshots {
            // At most 65535 bytes each: the stored ones fit their 16-bit
            // sizes, and QEMU limits new ones further. QEMU keeps them as C
            // strings, so it writes them up to the first zero byte.
            let id = (snapshot.storedID ?? Array(snapshot.id.utf8)).prefix(Int(UInt16.max)).prefix { $0 != 0 }
            let name = (snapshot.storedName ?? Array(snapshot.name.utf8)).prefix(Int(UInt16.max)).prefix { $0 != 0 }
            put(snapshot.l1TableOffset, 8)
            put(UInt64(snapshot.l1Size), 4)
            put(UInt64(id.count), 2)
            put(UInt64(name.count), 2)
            put(UInt64(snapshot.dateSeconds), 4)
            put(UInt64(snapshot.dateNanoseconds), 4)
            put(snapshot.vmClockNanoseconds, 8)
            put(snapshot.vmStateSize, 4)  // the low half, as QEMU writes it
            put(UInt64(knownExtraData + snapshot.unknownExtraData.count), 4)
            put(snapshot.vmStateSize, 8)
            put(snapshot.diskSize ?? guestSize, 8)
            put(snapshot.icount ?? .max, 8)
            bytes += snapshot.unknownExtraData
            bytes += id
            bytes += name
            bytes += [UInt8](repeating: 0, count: (8 - bytes.count % 8) % 8)
        }
        return bytes
    }

    /// Largest snapshot table read (QEMU's limit is 64 MiB).
    public static let maxTableBytes = 64 << 20
}
