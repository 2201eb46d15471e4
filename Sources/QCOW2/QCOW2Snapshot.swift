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
            // A VM state past 32 bits is 0 here, as QEMU writes it: an older
            // reader sees a snapshot without one, not a cut one.
            put(snapshot.vmStateSize <= 0xffff_ffff ? snapshot.vmStateSize : 0, 4)
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
