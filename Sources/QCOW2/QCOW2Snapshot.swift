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

    /// As `parseTable`, with the table's length in bytes: to the end of the
    /// last entry, without its padding, as QEMU counts it.
    ///
    /// `bytes` holds the table's first bytes, and the file goes on to
    /// `fileBytes` (the table's offset from the file's end). `forCheck`
    /// reads the table as qemu-img check does: what lies past the end of
    /// the file reads as zeroes, and an entry's L1 table is left for the
    /// check to judge (only an offset no image can use is refused). With
    /// `dropExcessExtraData` (`-r all`), an entry's extra data past QEMU's
    /// 1024 bytes is cut, each cut in `dropped`, and its id and name are
    /// read after all of it. QEMU's limit on the table's size counts the
    /// entries as kept.
    public static func parseTableAndLength(_ bytes: [UInt8], count: Int, fileBytes: Int? = nil, forCheck: Bool = false,
                                           dropExcessExtraData: Bool = false) throws
        -> (snapshots: [QCOW2Snapshot], length: Int, dropped: [DroppedExtraData]) {
        let fileBytes = max(fileBytes ?? bytes.count, bytes.count)
        /// `count` bytes from `start`; nil where they cannot be read (past
        /// `bytes` but inside the file, or past the file and not `forCheck`).
        func read(_ start: Int, _ count: Int) -> [UInt8]? {
            if start + count <= bytes.count { return Array(bytes[start..<start + count]) }
            // Past `bytes`: zeroes, where that is past the end of the file too.
            guard forCheck, bytes.count == fileBytes || start >= fileBytes else { return nil }
            let real = start < bytes.count ? Array(bytes[start...]) : []
            return real + [UInt8](repeating: 0, count: count - real.count)
        }
        var offset = 0
        var keptBytes = 0
        var snapshots: [QCOW2Snapshot] = []
        var dropped: [DroppedExtraData] = []
        for index in 0..<count {
            offset = (offset + 7) / 8 * 8
            guard let head = read(offset, 40) else { throw QCOW2Error("Snapshot table truncated") }
            let reader = BigEndianReader(head)
            let idSize = Int(reader.u16(at: 12))
            let nameSize = Int(reader.u16(at: 14))
            let storedExtraSize = Int(reader.u32(at: 36))
            var extraSize = storedExtraSize
            if extraSize > maxExtraData {
                guard dropExcessExtraData else { throw QCOW2Error("\(tooMuchExtraData) \(index)") }
                dropped.append(DroppedExtraData(entry: index, size: storedExtraSize))
                extraSize = maxExtraData
            }
            // The id and name follow the extra data as stored, kept or not.
            let namesStart = offset + 40 + storedExtraSize
            guard let extra = read(offset + 40, extraSize), let names = read(namesStart, idSize + nameSize) else {
                throw QCOW2Error("Snapshot table entry runs past the table")
            }
            keptBytes += 40 + extraSize + idSize + nameSize
            guard keptBytes <= maxTableBytes else { throw QCOW2Error(tableTooLarge) }
            let extraReader = BigEndianReader(extra)
            var snapshot = QCOW2Snapshot(
                l1TableOffset: reader.u64(at: 0), l1Size: reader.u32(at: 8),
                // C strings to QEMU: up to the first zero byte.
                id: String(decoding: names[..<idSize].prefix { $0 != 0 }, as: UTF8.self),
                name: String(decoding: names[idSize...].prefix { $0 != 0 }, as: UTF8.self),
                dateSeconds: reader.u32(at: 16), dateNanoseconds: reader.u32(at: 20),
                vmClockNanoseconds: reader.u64(at: 24), vmStateSize: UInt64(reader.u32(at: 32)))
            let l1Offset = snapshot.l1TableOffset
            let sizeValid = UInt64(snapshot.l1Size) * 8 <= QCOW2Header.maxL1Bytes
            // A check judges the L1 table itself (past the end of the file
            // at 2^61 on), and reads it only when it is aligned, of a valid
            // size and not empty: then only an offset past what a file
            // offset can hold (2^63) is refused.
            let refused = forCheck
                ? l1Offset > UInt64(Int64.max) && l1Offset % 512 == 0 && sizeValid && snapshot.l1Size > 0
                : l1Offset >= QCOW2Header.maxSize || l1Offset % 512 != 0 || !sizeValid
            guard !refused else { throw QCOW2Error("Snapshot L1 table offset or size invalid") }
            if extraSize >= 8 { snapshot.vmStateSize = extraReader.u64(at: 0) }
            if extraSize >= 16 { snapshot.diskSize = extraReader.u64(at: 8) }
            if extraSize >= 24, case let icount = extraReader.u64(at: 16), icount != .max { snapshot.icount = icount }
            snapshot.extraDataSize = extraSize
            snapshot.storedID = Array(names[..<idSize])
            snapshot.storedName = Array(names[idSize...])
            if extraSize > Self.knownExtraData { snapshot.unknownExtraData = Array(extra[Self.knownExtraData...]) }
            snapshots.append(snapshot)
            offset = namesStart + idSize + nameSize
        }
        return (snapshots, offset, dropped)
    }

    /// The extra data QEMU knows: the large VM state size, the disk size
    /// and the instruction count, 8 bytes each.
    static let knownExtraData = 24

    /// The table as QEMU writes it: every entry with the full known extra
    /// data (all ones for an unknown instruction count, `guestSize` for an
    /// unknown disk size) and its unknown extra data after it, each entry
    /// starting on the 8-byte grid, the table ending where its last entry
    /// does (QEMU's length of it, and as far as it writes).
    public static func serializeTable(_ snapshots: [QCOW2Snapshot], guestSize: UInt64) -> [UInt8] {
        var bytes: [UInt8] = []
        func put(_ value: UInt64, _ width: Int) {
            for index in (0..<width).reversed() { bytes.append(UInt8(truncatingIfNeeded: value >> UInt64(8 * index))) }
        }
        for snapshot in snapshots {
            bytes += [UInt8](repeating: 0, count: (8 - bytes.count % 8) % 8)
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
        }
        return bytes
    }

    /// Largest snapshot table read (QEMU's limit is 64 MiB).
    public static let maxTableBytes = 64 << 20
}
