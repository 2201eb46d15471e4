@testable import QCOW2
import Testing

/// Header parsing against hand-built headers: what QEMU writes, and what
/// a hostile file might hold.
@Suite struct QCOW2HeaderTests {
    /// A v3 header like `qemu-img create -f qcow2 x 64M` writes.
    func defaultHeader() -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 65536)
        func put(_ offset: Int, _ value: UInt64, _ size: Int) {
            for index in 0..<size { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (size - 1 - index))) }
        }
        put(0, 0x5146_49fb, 4)
        put(4, 3, 4)
        put(20, 16, 4)
        put(24, 64 << 20, 8)
        put(36, 1, 4)
        put(40, 0x30000, 8)
        put(48, 0x10000, 8)
        put(56, 1, 4)
        put(96, 4, 4)
        put(100, 112, 4)
        // A backing format extension, then the end marker.
        put(112, 0xe279_2aca, 4)
        put(116, 5, 4)
        bytes.replaceSubrange(120..<125, with: Array("qcow2".utf8))
        return bytes
    }

    /// Parsing `bytes` fails with an error whose text holds `text`.
    func expectRefusal(_ bytes: [UInt8], mentioning text: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(sourceLocation: sourceLocation) {
            _ = try QCOW2Header.parse(bytes)
        } throws: { error in
            "\(error)".contains(text)
        }
    }

    @Test func parsesWhatQemuWrites() throws {
        let header = try QCOW2Header.parse(defaultHeader())
        #expect(header.version == 3)
        #expect(header.clusterSize == 65536)
        #expect(header.size == 64 << 20)
        #expect(header.l2Entries == 8192)
        #expect(header.refcountBits == 16)
        #expect(header.backingFormat == "qcow2")
        #expect(header.extensions.count == 1)
    }

    /// QEMU reads the backing format as a C string, and an empty one as
    /// none (it then probes the backing file).
    @Test func backingFormatEndsAtANulAndEmptyIsNone() throws {
        var padded = defaultHeader()
        padded[116 + 3] = 8  // "qcow2" and three NULs
        #expect(try QCOW2Header.parse(padded).backingFormat == "qcow2")
        var empty = defaultHeader()
        empty[116 + 3] = 0
        empty.replaceSubrange(120..<125, with: [0, 0, 0, 0, 0])  // the end marker follows at once
        #expect(try QCOW2Header.parse(empty).backingFormat == nil)
    }

    /// `qemu-img info` of an image with two backing format extensions,
    /// "raw" then "qcow2", says qcow2: each one overwrites the one before.
    @Test func ofTwoBackingFormatsTheLastWins() throws {
        var bytes = defaultHeader()
        bytes.replaceSubrange(120..<125, with: Array("raw".utf8) + [0, 0])
        bytes[116 + 3] = 3
        bytes.replaceSubrange(128..<136, with: [0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 5])
        bytes.replaceSubrange(136..<141, with: Array("qcow2".utf8))
        let header = try QCOW2Header.parse(bytes)
        #expect(header.extensions.count == 2)
        #expect(header.backingFormat == "qcow2")
    }

    /// qemu-img refuses to open an image whose backing format extension
    /// holds 16 bytes or more, with this message.
    @Test func refusesABackingFormatTooLongForQemu() throws {
        var bytes = defaultHeader()
        bytes[116 + 3] = 15
        bytes.replaceSubrange(120..<135, with: Array("qcow2xxxxxxxxxx".utf8))
        #expect(try QCOW2Header.parse(bytes).backingFormat == "qcow2xxxxxxxxxx")
        bytes[116 + 3] = 16
        bytes[135] = UInt8(ascii: "x")
        expectRefusal(bytes, mentioning: "ext_backing_format: len=16 too large (>=16)")
    }

    /// QEMU reads extensions up to the backing file name: no end marker is
    /// needed before it, and an extension reaching into it is refused.
    @Test func extensionsEndWhereTheBackingNameBegins() throws {
        var bytes = defaultHeader()
        bytes.replaceSubrange(8..<16, with: [0, 0, 0, 0, 0, 0, 0, 128])
        bytes.replaceSubrange(16..<20, with: [0, 0, 0, 10])
        bytes.replaceSubrange(128..<138, with: Array("base.qcow2".utf8))
        let header = try QCOW2Header.parse(bytes)
        #expect(header.extensions.count == 1)
        #expect(header.backingFormat == "qcow2")
        #expect(header.backingFile == "base.qcow2")
        bytes[116 + 3] = 12  // the backing format now reaches into the name
        expectRefusal(bytes, mentioning: "Header extension too large")
    }

    /// An end marker is read as any extension: a length past the header
    /// cluster is refused, as QEMU refuses it.
    @Test func anEndMarkerWithALengthPastTheClusterIsRefused() throws {
        var bytes = defaultHeader()
        bytes.replaceSubrange(128..<136, with: [0, 0, 0, 0, 0, 1, 0, 0])
        expectRefusal(bytes, mentioning: "Header extension too large")
    }

    /// A bitmaps extension is 24 bytes long, stale or not; a stale one (no
    /// autoclear bit) is otherwise not looked into, as QEMU ignores it.
    @Test func aBitmapsExtensionIsCheckedForItsLengthOnly() throws {
        var bytes = defaultHeader()
        // In place of the backing format extension, whose 8 padded bytes
        // the end marker follows.
        bytes.replaceSubrange(112..<120, with: [0x23, 0x85, 0x28, 0x75, 0, 0, 0, 8])
        expectRefusal(bytes, mentioning: "bitmaps_ext: Invalid extension length")
        bytes.replaceSubrange(112..<152, with: [0x23, 0x85, 0x28, 0x75, 0, 0, 0, 24] + [UInt8](repeating: 0xff, count: 24)
                              + [UInt8](repeating: 0, count: 8))
        let header = try QCOW2Header.parse(bytes)
        #expect(header.hasStaleBitmapsExtension)
    }

    /// The bitmaps extension's reserved word must be zero, as QEMU checks.
    @Test func aBitmapsExtensionWithAReservedWordIsRefused() throws {
        let header = try QCOW2Header.parse(defaultHeader())
        var data = [UInt8](repeating: 0, count: 24)
        data[3] = 1  // one bitmap
        data[15] = 64  // a 64-byte directory
        data[21] = 4  // at 0x40000
        _ = try QCOW2BitmapDirectory.location(data, header: header)
        data[7] = 1
        #expect {
            _ = try QCOW2BitmapDirectory.location(data, header: header)
        } throws: { error in
            "\(error)".contains("bitmaps_ext: Reserved field is not zero")
        }
    }

    @Test(arguments: [
        (20, UInt64(40), 4, "cluster size"),
        (20, UInt64(8), 4, "cluster size"),
        (36, UInt64(0xffff_ffff), 4, "L1 table too large"),
        (36, UInt64(0), 4, "L1 table is too small"),
        (72, UInt64(1) << 40, 8, "incompatible"),
        (32, UInt64(1), 4, "not supported"),
        (96, UInt64(7), 4, "Reference count"),
        (100, UInt64(1) << 30, 4, "header exceeds cluster size"),
        (24, UInt64.max, 8, "Image is too big"),
        (40, UInt64(12345), 8, "offset invalid"),
        (8, UInt64.max, 8, "Invalid backing file offset"),
        (56, UInt64(0), 4, "does not contain a reference count table"),
    ])
    func refusesHostileFields(offset: Int, value: UInt64, size: Int, mentions: String) {
        var bytes = defaultHeader()
        for index in 0..<size { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (size - 1 - index))) }
        #expect {
            _ = try QCOW2Header.parse(bytes)
        } throws: { error in
            "\(error)".lowercased().contains(mentions.lowercased())
        }
    }

    @Test func refusesTruncatedAndForeignFiles() {
        #expect(throws: QCOW2Error.self) { try QCOW2Header.parse([]) }
        #expect(throws: QCOW2Error.self) { try QCOW2Header.parse(Array(defaultHeader().prefix(80))) }
        #expect(throws: QCOW2Error.self) { try QCOW2Header.parse([UInt8](repeating: 0, count: 512)) }
    }

    @Test func extensionsRunningPastTheClusterAreRefused() {
        var bytes = defaultHeader()
        bytes[116] = 0x7f  // length 0x7f000005
        #expect(throws: QCOW2Error.self) { try QCOW2Header.parse(bytes) }
    }

    @Test func decodesEntries() {
        // A standard data entry with COPIED.
        #expect(QCOW2Entry.mapping(entry: 1 << 63 | 0x50000, bitmap: nil, subcluster: 0, clusterBits: 16)
                == .data(hostOffset: 0x50000))
        #expect(QCOW2Entry.mapping(entry: 1, bitmap: nil, subcluster: 0, clusterBits: 16) == .zero(hostOffset: nil))
        #expect(QCOW2Entry.mapping(entry: 0, bitmap: nil, subcluster: 0, clusterBits: 16) == .unallocated)
        // Compressed, 64 KiB clusters: x = 54; offset 0x12345, one extra sector.
        let compressed: UInt64 = 1 << 62 | 1 << 54 | 0x12345
        #expect(QCOW2Entry.mapping(entry: compressed, bitmap: nil, subcluster: 0, clusterBits: 16)
                == .compressed(hostOffset: 0x12345, size: 1024 - 0x145))
        // Extended L2: subcluster 3 allocated, 4 zero, 5 unallocated.
        let bitmap: UInt64 = 1 << 3 | 1 << (32 + 4)
        #expect(QCOW2Entry.mapping(entry: 0x60000, bitmap: bitmap, subcluster: 3, clusterBits: 17) == .data(hostOffset: 0x60000))
        // Zero and unallocated subclusters keep the cluster's host offset.
        #expect(QCOW2Entry.mapping(entry: 0x60000, bitmap: bitmap, subcluster: 4, clusterBits: 17) == .zero(hostOffset: 0x60000))
        #expect(QCOW2Entry.mapping(entry: 0x60000, bitmap: bitmap, subcluster: 5, clusterBits: 17)
                == .unallocatedSubcluster(hostOffset: 0x60000))
        // Without host space: zero or unallocated subclusters only.
        let zeroOnly: UInt64 = 1 << (32 + 4)
        #expect(QCOW2Entry.mapping(entry: 0, bitmap: zeroOnly, subcluster: 4, clusterBits: 17) == .zero(hostOffset: nil))
        #expect(QCOW2Entry.mapping(entry: 0, bitmap: zeroOnly, subcluster: 5, clusterBits: 17) == .unallocated)
        // The zero flag of a standard entry means nothing with extended L2.
        #expect(QCOW2Entry.mapping(entry: 0x60001, bitmap: bitmap, subcluster: 3, clusterBits: 17) == .data(hostOffset: 0x60001 & ~1))
        // With an external data file, offset 0 with COPIED is host space.
        #expect(QCOW2Entry.mapping(entry: 1 << 63, bitmap: bitmap, subcluster: 4, clusterBits: 17, externalData: true)
                == .zero(hostOffset: 0))
        #expect(QCOW2Entry.mapping(entry: 1 << 63, bitmap: bitmap, subcluster: 5, clusterBits: 17, externalData: true)
                == .unallocatedSubcluster(hostOffset: 0))
    }

    /// QEMU reads a bitmap as a whole: any subcluster both allocated and
    /// zero, or allocated with no host cluster, makes every subcluster of
    /// the entry invalid (qemu-io: "Invalid cluster entry found").
    @Test(arguments: [
        (entry: UInt64(0x60000), bitmap: UInt64(1 << 3 | 1 << (32 + 3))),
        (entry: UInt64(0), bitmap: UInt64(1 << 3)),
        (entry: UInt64(1) << 63, bitmap: UInt64(1 << 3)),
    ])
    func anInvalidBitmapSpoilsTheWholeCluster(entry: UInt64, bitmap: UInt64) {
        for subcluster in [0, 3, 5, 31] {
            #expect(QCOW2Entry.mapping(entry: entry, bitmap: bitmap, subcluster: subcluster, clusterBits: 17) == nil)
        }
    }

    /// The read path's shortcut answers for plain data only, and then as
    /// the full decode does; for every other entry it leaves the decision
    /// to the decode (which also refuses what a correct image cannot hold).
    @Test func thePlainDataShortcutAgreesWithTheDecode() {
        var random = SplitMix64(seed: 11)
        let flags: [UInt64] = [0, QCOW2Entry.copied, QCOW2Entry.compressed, QCOW2Entry.zeroFlag, 1 << 3, 1 << 60]
        for clusterBits in UInt32(9)...21 {
            let clusterSize = Int64(1) << clusterBits
            for _ in 0..<2000 {
                var entry = flags[Int(random.next() % UInt64(flags.count))] | flags[Int(random.next() % UInt64(flags.count))]
                switch random.next() % 3 {
                case 0: break                                                  // no offset
                case 1: entry |= (random.next() << clusterBits) & QCOW2Entry.offsetMask  // aligned
                default: entry |= random.next() & QCOW2Entry.offsetMask        // sector-aligned only
                }
                let mapping = QCOW2Entry.mapping(entry: entry, bitmap: nil, subcluster: 0, clusterBits: clusterBits)
                let host = QCOW2Entry.plainDataCluster(entry, clusterSize: clusterSize)
                if let host {
                    #expect(mapping == .data(hostOffset: host), "entry 0x\(String(entry, radix: 16))")
                } else if case .data(let offset) = mapping, offset % UInt64(clusterSize) == 0,
                          entry & QCOW2Entry.l2ReservedMask == 0 {
                    Issue.record("valid data entry 0x\(String(entry, radix: 16)) not taken by the shortcut")
                }
            }
        }
    }

    /// One snapshot table entry (unpadded): the 40-byte header with the
    /// sizes filled in, then `extra`, `id` and `name`.
    func snapshotEntry(l1Size: UInt8, id: [UInt8], name: [UInt8], extra: [UInt8]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 40)
        bytes[11] = l1Size
        bytes[13] = UInt8(id.count)
        bytes[15] = UInt8(name.count)
        bytes[39] = UInt8(extra.count)
        return bytes + extra + id + name
    }

    @Test func parsesSnapshotTables() throws {
        // Extra data: vm state 0, disk size 1 MiB.
        let bytes = snapshotEntry(l1Size: 2, id: Array("1".utf8), name: Array("snap".utf8),
                                  extra: [UInt8](repeating: 0, count: 8) + [0, 0, 0, 0, 0, 0x10, 0, 0])
        let snapshots = try QCOW2SnapshotTable(parsing: bytes, count: 1).snapshots
        #expect(snapshots.first?.name == "snap")
        #expect(snapshots.first?.id == "1")
        #expect(snapshots.first?.diskSize == 1 << 20)
        #expect(throws: QCOW2Error.self) { try QCOW2SnapshotTable(parsing: bytes, count: 2).snapshots }
        // A snapshot L1 table at an absurd offset is refused, not converted.
        var hostile = bytes
        for index in 0..<8 { hostile[index] = 0xff }
        #expect(throws: QCOW2Error.self) { try QCOW2SnapshotTable(parsing: hostile, count: 1).snapshots }
    }

    /// A table written again keeps every field and unknown extra data,
    /// gains the known extra data, and puts each entry on the 8-byte grid.
    @Test func snapshotTablesAreWrittenAsQemuWritesThem() throws {
        var old = QCOW2Snapshot(l1TableOffset: 0x30000, l1Size: 3, id: "7", name: "n\u{e9}", dateSeconds: 5,
                                dateNanoseconds: 6, vmClockNanoseconds: 7_000_000_123, vmStateSize: 1 << 33)
        old.unknownExtraData = [1, 2, 3, 4, 5, 6, 7, 8]
        var second = old
        second.name = "two"
        second.icount = 99
        second.diskSize = 1 << 30
        let bytes = QCOW2Snapshot.serializeTable([old, second], guestSize: 1 << 20)
        #expect(bytes.count == 80 + 76)
        #expect(bytes[32..<36] == [0, 0, 0, 0], "8 GiB of VM state: 0 in the 32-bit field")
        let table = try QCOW2SnapshotTable(parsing: bytes, count: 2)
        let parsed = table.snapshots
        // To the end of the last entry, without padding, as QEMU counts.
        #expect(table.length == bytes.count)
        #expect(parsed[0].vmStateSize == 1 << 33 && parsed[0].diskSize == 1 << 20 && parsed[0].icount == nil)
        #expect(parsed[0].name == old.name && parsed[0].unknownExtraData == old.unknownExtraData)
        #expect(parsed[0].extraDataSize == 32)
        #expect(parsed[1].icount == 99 && parsed[1].diskSize == 1 << 30 && parsed[1].name == "two")
        #expect(parsed[1].l1TableOffset == 0x30000 && parsed[1].l1Size == 3 && parsed[1].vmClockNanoseconds == 7_000_000_123)
    }

    /// Ids and names go back byte for byte, UTF-8 or not (QEMU does not
    /// check): a table already complete is written as it was read.
    @Test func snapshotNamesAreWrittenBackByteForByte() throws {
        // Extra data: vm state 0, disk size 1 MiB, no icount; a name that is not UTF-8.
        let entry = snapshotEntry(l1Size: 1, id: Array("9".utf8), name: [0xff, 0x41, 0xc3],
                                  extra: [UInt8](repeating: 0, count: 8) + [0, 0, 0, 0, 0, 0x10, 0, 0]
                                      + [UInt8](repeating: 0xff, count: 8))
        let snapshots = try QCOW2SnapshotTable(parsing: entry, count: 1).snapshots
        #expect(QCOW2Snapshot.serializeTable(snapshots, guestSize: 1 << 30) == entry)
    }

    /// As qemu-img check reads a damaged table: past the end of the file
    /// zeroes, and under `-r all` extra data cut to QEMU's 1024 bytes, the
    /// id and name found after all of it. A plain open refuses both.
    @Test func checksReadDamagedSnapshotTablesAsQemuDoes() throws {
        // One entry with 1500 bytes of extra data: 24 known, 1476 unknown.
        var header = [UInt8](repeating: 0, count: 40)
        header[11] = 1
        header[13] = 1
        header[15] = 1
        header[38] = 0x05
        header[39] = 0xdc
        var entry = header + [UInt8](repeating: 0, count: 24) + [UInt8](repeating: 0x5a, count: 1476) + Array("1a".utf8)
        entry += [UInt8](repeating: 0, count: (8 - entry.count % 8) % 8)
        #expect(throws: QCOW2Error.self) { try QCOW2SnapshotTable(parsing: entry, count: 1).snapshots }
        #expect(throws: QCOW2Error.self) { try QCOW2SnapshotTable(parsing: entry, count: 3, forCheck: true) }
        #expect(throws: QCOW2Error.self) { try QCOW2SnapshotTable(parsing: entry, count: 3, repairing: true) }

        let table = try QCOW2SnapshotTable(parsing: entry, count: 3, forCheck: true, repairing: true)
        let (parsed, length) = (table.snapshots, table.length)
        #expect(table.droppedExtraData == [QCOW2SnapshotTable.DroppedExtraData(entry: 0, size: 1500)])
        #expect(table.overhanging == 0)
        #expect(parsed[0].extraDataSize == 1024 && parsed[0].unknownExtraData == [UInt8](repeating: 0x5a, count: 1000))
        #expect(parsed[0].id == "1" && parsed[0].name == "a" && parsed[0].l1Size == 1)
        // Two entries of zeroes past the end: no extra data (incomplete).
        #expect(parsed[1].extraDataSize == 0 && parsed[2].l1Size == 0 && parsed[2].id == "")
        #expect(length == entry.count + 80)
        // Written again: 1024 bytes of extra data, within QEMU's limit.
        let rewritten = QCOW2Snapshot.serializeTable([parsed[0]], guestSize: 1 << 20)
        let again = try QCOW2SnapshotTable(parsing: rewritten, count: 1)
        #expect(again.snapshots[0].unknownExtraData == parsed[0].unknownExtraData && again.snapshots[0].name == "a")

        // Extra data claiming 144 MiB: the id and name are read that far
        // on, past the end of the file, as zeroes; nothing that far is held.
        var hostile = entry
        hostile.replaceSubrange(36..<40, with: [0x09, 0x09, 0x09, 0x09])
        let far = try QCOW2SnapshotTable(parsing: hostile, count: 1, forCheck: true, repairing: true)
        #expect(far.snapshots[0].id == "" && far.snapshots[0].name == "" && far.length == 40 + 0x0909_0909 + 2)
        // Claiming 4 GiB, it takes the table past 2 GiB: the entry and all
        // after it are dropped (QEMU's "overhanging snapshots"); a plain
        // check refuses the table.
        var huge = entry
        huge.replaceSubrange(36..<40, with: [0xff, 0xff, 0xff, 0xff])
        let dropped = try QCOW2SnapshotTable(parsing: huge + entry, count: 3, forCheck: true, repairing: true)
        #expect(dropped.snapshots.isEmpty && dropped.overhanging == 3 && dropped.length == 0)
        #expect(dropped.droppedExtraData == [QCOW2SnapshotTable.DroppedExtraData(entry: 0, size: 0xffff_ffff)])
        let error = #expect(throws: QCOW2Error.self) {
            try QCOW2SnapshotTable(parsing: huge, count: 1, forCheck: true)
        }
        #expect(error?.message.hasPrefix(QCOW2SnapshotTable.tooMuchExtraData + " 0\n") == true)
        // An L1 table off the grid, or past anything a file holds, is the
        // check's to judge; from 2^63 on (no file offset) refused by all.
        for (l1Offset, checkReads) in [(UInt64(0x10010), true), (0x7878_0000_0000_0000, true), (0xf000_0000_0000_0000, false)] {
            var odd = entry
            odd.replaceSubrange(0..<8, with: (0..<8).map { UInt8(truncatingIfNeeded: l1Offset >> (56 - 8 * $0)) })
            #expect(throws: QCOW2Error.self) { try QCOW2SnapshotTable(parsing: odd, count: 1, repairing: true) }
            let read = try? QCOW2SnapshotTable(parsing: odd, count: 1, forCheck: true, repairing: true)
            #expect((read != nil) == checkReads, "0x\(String(l1Offset, radix: 16))")
        }
        // Inside the file but past what was read of it: refused, not guessed.
        #expect(throws: QCOW2Error.self) {
            try QCOW2SnapshotTable(parsing: hostile, count: 1, fileBytes: 1 << 40, forCheck: true, repairing: true)
        }
    }

    /// QEMU keeps ids and names as C strings: a zero byte ends them, when
    /// they are read and when the table is written again.
    @Test func snapshotNamesEndAtAZeroByte() throws {
        var entry = snapshotEntry(l1Size: 1, id: [0x31, 0], name: [0, 0, 0], extra: [UInt8](repeating: 0, count: 24))
        entry += [UInt8](repeating: 0, count: (8 - entry.count % 8) % 8)
        let snapshots = try QCOW2SnapshotTable(parsing: entry, count: 1).snapshots
        #expect(snapshots[0].id == "1" && snapshots[0].name == "")
        let written = QCOW2Snapshot.serializeTable(snapshots, guestSize: 0)
        #expect(written[12..<16] == [0, 1, 0, 0])
        #expect(written.count == 65)
    }
}
