/// The snapshot table as read from an image: its entries, how far it
/// reaches, and what a repairing check cut from it as it read it.
///
/// A server reads a table that must be whole; a check reads it as
/// `qemu-img check` does, so that it can report and repair what a server
/// refuses (see `init(parsing:count:fileBytes:forCheck:repairing:)`).
public struct QCOW2SnapshotTable: Sendable {
    public var snapshots: [QCOW2Snapshot]
    /// Bytes from the table's offset to the end of its last entry, without
    /// padding: QEMU's length of it, which decides the clusters it uses.
    public var length: Int
    /// Entries whose extra data a repair cut to QEMU's limit, in order.
    public var droppedExtraData: [DroppedExtraData] = []
    /// Entries a repair dropped from the end: from the first that took the
    /// table past QEMU's limit on its size.
    public var overhanging = 0

    /// An entry whose extra data was cut to `maxExtraData` as it was read.
    public struct DroppedExtraData: Equatable, Sendable {
        /// The entry's index in the table.
        public var entry: Int
        /// The extra data's length as the entry gave it.
        public var size: Int
    }

    /// The most extra data an entry may have (QEMU's limit).
    public static let maxExtraData = 1024
    /// How the error for an entry with more extra data starts (the entry's
    /// index and a hint follow).
    public static let tooMuchExtraData = "Too much extra metadata in snapshot table entry"
    /// How the error for a table past QEMU's limits starts (a hint follows).
    public static let tooBig = "Snapshot table is too big"

    /// No table: an image without snapshots.
    static let none = QCOW2SnapshotTable(snapshots: [], length: 0)

    private init(snapshots: [QCOW2Snapshot], length: Int) {
        self.snapshots = snapshots
        self.length = length
    }

    /// Parses `count` entries: each 40 bytes, extra data, id and name, on
    /// the 8-byte grid.
    ///
    /// `bytes` holds the table's first bytes, and the file goes on for
    /// `fileBytes` from the table's offset; `clusterSize` is the image's.
    /// `forCheck` reads the table as qemu-img check does: what lies past
    /// the end of the file reads as zeroes, and an entry's L1 table is left
    /// for the check to judge (only an offset past 2^63 is refused, where
    /// the check would read it). `repairing` (`check -r all`) cuts an
    /// entry's extra data to 1024 bytes, reading its id and name after all
    /// of it, and drops the entries from the one that takes the table past
    /// QEMU's limits (64 MiB as kept, 2 GiB as stored); without it, both
    /// refuse the table. Anything past `bytes` but inside the file, which
    /// was not read, refuses the table too.
    public init(parsing bytes: [UInt8], count: Int, fileBytes: Int? = nil, clusterSize: Int = 512,
                forCheck: Bool = false, repairing: Bool = false) throws {
        let fileBytes = max(fileBytes ?? bytes.count, bytes.count)
        /// `count` bytes from `start`, or nil where they cannot be read.
        func read(_ start: Int, _ count: Int) -> [UInt8]? {
            if start + count <= bytes.count { return Array(bytes[start..<start + count]) }
            // Past `bytes`: zeroes, where that is past the end of the file too.
            guard forCheck, bytes.count == fileBytes || start >= fileBytes else { return nil }
            let real = start < bytes.count ? Array(bytes[start...]) : []
            return real + [UInt8](repeating: 0, count: count - real.count)
        }
        snapshots = []
        var offset = 0
        var keptBytes = 0
        for index in 0..<count {
            let entryStart = offset
            offset = (offset + 7) / 8 * 8
            keptBytes = (keptBytes + 7) / 8 * 8
            guard let head = read(offset, 40) else { throw QCOW2Error("Snapshot table truncated") }
            let reader = BigEndianReader(head)
            let idSize = Int(reader.u16(at: 12))
            let nameSize = Int(reader.u16(at: 14))
            let storedExtraSize = Int(reader.u32(at: 36))
            var extraSize = storedExtraSize
            if extraSize > Self.maxExtraData {
                guard repairing else {
                    throw QCOW2Error("\(Self.tooMuchExtraData) \(index)\n"
                        + "You can force-remove this extra metadata with strata img check -r all")
                }
                droppedExtraData.append(DroppedExtraData(entry: index, size: storedExtraSize))
                extraSize = Self.maxExtraData
            }
            // The id and name follow the extra data as stored, kept or not.
            let namesStart = offset + 40 + storedExtraSize
            guard let extra = read(offset + 40, extraSize), let names = read(namesStart, idSize + nameSize) else {
                throw QCOW2Error("Snapshot table entry runs past the table")
            }
            offset = namesStart + idSize + nameSize
            keptBytes += 40 + extraSize + idSize + nameSize
            if keptBytes > QCOW2Snapshot.maxTableBytes || offset > Int(Int32.max) {
                guard repairing else {
                    throw QCOW2Error("\(Self.tooBig)\n"
                        + "You can force-remove all \(count - index) overhanging snapshots with strata img check -r all")
                }
                // The rest of the table, and what only those snapshots
                // held, is left for the refcount repair to free.
                overhanging = count - index
                offset = entryStart
                break
            }
            snapshots.append(try QCOW2Snapshot(entry: head, extra: extra, names: names, idSize: idSize,
                                               forCheck: forCheck, clusterSize: clusterSize))
        }
        length = offset
    }
}

extension QCOW2Snapshot {
    /// One entry: its 40-byte header, the extra data kept, id and name.
    init(entry head: [UInt8], extra: [UInt8], names: [UInt8], idSize: Int, forCheck: Bool, clusterSize: Int) throws {
        let reader = BigEndianReader(head)
        self.init(
            l1TableOffset: reader.u64(at: 0), l1Size: reader.u32(at: 8),
            // C strings to QEMU: up to the first zero byte.
            id: String(decoding: names[..<idSize].prefix { $0 != 0 }, as: UTF8.self),
            name: String(decoding: names[idSize...].prefix { $0 != 0 }, as: UTF8.self),
            dateSeconds: reader.u32(at: 16), dateNanoseconds: reader.u32(at: 20),
            vmClockNanoseconds: reader.u64(at: 24), vmStateSize: UInt64(reader.u32(at: 32)))
        let sizeValid = UInt64(l1Size) * 8 <= QCOW2Header.maxL1Bytes
        // A check judges the L1 table itself (past the end of the file at
        // 2^61 on), and reads it only when it is cluster-aligned, of a valid
        // size and not empty: then only an offset past what a file offset
        // can hold (2^63) is refused.
        let refused = forCheck
            ? l1TableOffset > UInt64(Int64.max) && l1TableOffset % UInt64(clusterSize) == 0 && sizeValid && l1Size > 0
            : l1TableOffset >= QCOW2Header.maxSize || l1TableOffset % 512 != 0 || !sizeValid
        guard !refused else { throw QCOW2Error("Snapshot L1 table offset or size invalid") }
        let extraReader = BigEndianReader(extra)
        if extra.count >= 8 { vmStateSize = extraReader.u64(at: 0) }
        if extra.count >= 16 { diskSize = extraReader.u64(at: 8) }
        if extra.count >= 24, case let count = extraReader.u64(at: 16), count != .max { icount = count }
        extraDataSize = extra.count
        storedID = Array(names[..<idSize])
        storedName = Array(names[idSize...])
        if extra.count > Self.knownExtraData { unknownExtraData = Array(extra[Self.knownExtraData...]) }
    }
}
