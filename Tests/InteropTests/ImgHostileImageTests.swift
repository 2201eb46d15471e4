import Foundation
import Testing

/// Images qemu-img made, then damaged the way fuzzing found hurtful:
/// `strata img` answers with an error or a report, never a trap, a hang
/// or gigabytes of memory.
@Suite struct ImgHostileImageTests: ImageToolRunner {
    /// A snapshot whose 64-bit VM state size does not fit a signed integer.
    @Test func aHugeSnapshotStateSizeIsPrinted() throws {
        let directory = try Harness.temporaryDirectory("vmstate")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("s.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]).status == 0)
        #expect(try qemuImg(["snapshot", "-c", "s1", path]).status == 0)
        let table = try u64(path, at: 64)
        // The entry's extra data starts 40 bytes in, with vm_state_size_large.
        #expect(try u32(path, at: table + 36) >= 8, "qemu-img wrote the extra data")
        try write(path, UInt64.max, width: 8, at: table + 40)
        for arguments in [["info", path], ["info", "--output=json", path]] {
            let info = try img(arguments)
            #expect(info.status == 0, "\(arguments): \(info.stderr)")
            #expect(info.stdout.contains("s1"))
        }
    }

    /// A guest size off the 512-byte grid (qemu-img never writes one) is
    /// cut down to whole sectors, as QEMU reads it: the same virtual size
    /// and map as qemu-img's.
    @Test func aSizeOffTheSectorGridIsCutToWholeSectors() throws {
        let directory = try Harness.temporaryDirectory("oddsize")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("o.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "1M"]).status == 0)
        try write(path, (1 << 20) - 8, width: 8, at: 24)
        for command in [["info", "--output=json"], ["map", "--output=json"]] {
            let ours = try img(command + [path])
            let theirs = try qemuImg(command + [path])
            #expect(ours.status == 0 && theirs.status == 0, "\(ours.stderr)\(theirs.stderr)")
            let size = { (text: String) in text.contains("\((1 << 20) - 512)") && !text.contains("\((1 << 20) - 8)") }
            #expect(size(theirs.stdout), "qemu-img: \(theirs.stdout)")
            #expect(size(ours.stdout), "\(command): \(ours.stdout)")
        }
    }

    /// Two data-file extensions: QEMU reads every extension in turn, so
    /// the last name wins, for info as for the data read.
    @Test func ofTwoDataFileNamesTheLastCounts() throws {
        let directory = try Harness.temporaryDirectory("twodata")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("d.qcow2").path
        let first = directory.appendingPathComponent("first.raw").path
        let second = directory.appendingPathComponent("second.raw").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "data_file=\(first)", image, "1M"]).status == 0)
        #expect(try qemuImg(["create", "-q", "-f", "raw", second, "1M"]).status == 0)
        // Walk the extensions to their end marker; put a second one there.
        var position = UInt64(try u32(image, at: 100))  // header_length
        while try u32(image, at: position) != 0 {
            position += 8 + (UInt64(try u32(image, at: position + 4)) + 7) / 8 * 8
        }
        let name = Array(second.utf8)
        try write(image, 0x4441_5441, width: 4, at: position)
        try write(image, UInt64(name.count), width: 4, at: position + 4)
        try write(image, bytes: name + [UInt8](repeating: 0, count: (8 - name.count % 8) % 8 + 8), at: position + 8)
        let theirs = try qemuImg(["info", image])
        #expect(theirs.stdout.contains("data file: \(second)"), "\(theirs.stdout)")
        let ours = try img(["info", image])
        #expect(ours.stdout == theirs.stdout, "\(ours.stdout)\n--\n\(theirs.stdout)")
    }

    /// An image that names itself as its backing file, and two that name
    /// each other: refused at once, not opened 64 levels deep.
    @Test func aBackingChainThatLoopsIsRefused() throws {
        let directory = try Harness.temporaryDirectory("loop")
        defer { try? FileManager.default.removeItem(at: directory) }
        let a = directory.appendingPathComponent("a.qcow2").path
        let b = directory.appendingPathComponent("b.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", a, "16M"]).status == 0)
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-b", a, "-F", "qcow2", b]).status == 0)
        #expect(try qemuImg(["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a]).status == 0)
        let own = directory.appendingPathComponent("own.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", own, "16M"]).status == 0)
        #expect(try qemuImg(["rebase", "-u", "-b", "own.qcow2", "-F", "qcow2", own]).status == 0)
        for image in [a, b, own] {
            // Plain info does not open the backing file (as qemu-img info).
            for command in [["check"], ["map"]] {
                let result = try img(command + [image])
                #expect(result.status == 1, "\(command) \(image): \(result.stdout)\(result.stderr)")
                #expect(result.stderr.contains("Backing file chain loops"), "\(result.stderr)")
            }
            // info walks the chain image by image, and says what qemu-img says.
            let described = try img(["info", "--backing-chain", image])
            let qemu = try qemuImg(["info", "--backing-chain", image])
            #expect(described.status == 1 && qemu.status == 1, "\(image): \(described.stderr)")
            #expect(described.stderrAsQemuImg() == qemu.stderr, "\(described.stderr)--\n\(qemu.stderr)")
        }
    }

    /// A bitmap whose table would be 128 MiB for a 16 MiB disk: refused on
    /// open, naming the bitmap, as qemu-img refuses it (not a table to read).
    @Test func aBitmapOutsideQemusConstraintsIsRefused() throws {
        let directory = try Harness.temporaryDirectory("bitmap")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("b.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", path, "b0"]).status == 0)
        #expect(try img(["check", path]).status == 0)
        // The first entry of the directory has the table size at 8.
        try write(path, 1 << 24, width: 4, at: try #require(try bitmapDirectoryOffset(path)) + 8)
        #expect(try qemuImg(["check", path]).status == 1)
        for command in ["info", "check", "map"] {
            let result = try img([command, path])
            #expect(result.status == 1, "\(command): \(result.stdout)\(result.stderr)")
            #expect(result.stderr.contains("Bitmap 'b0' doesn't satisfy the constraints"), "\(command): \(result.stderr)")
        }
    }

    /// Where the data of the bitmaps extension of `path` starts (header
    /// extensions follow the header): the count at 0, the directory's size
    /// at 8 and its offset at 16.
    func bitmapsExtensionOffset(_ path: String) throws -> UInt64? {
        var position = UInt64(try u32(path, at: 100))
        while position < 4096 {
            let type = try u32(path, at: position)
            let length = UInt64(try u32(path, at: position + 4))
            guard type != 0 else { break }
            if type == 0x2385_2875 { return position + 8 }
            position += 8 + (length + 7) / 8 * 8
        }
        return nil
    }

    /// Where the bitmap directory of `path` starts.
    func bitmapDirectoryOffset(_ path: String) throws -> UInt64? {
        try bitmapsExtensionOffset(path).map { try u64(path, at: $0 + 16) }
    }

    enum BitmapTableDamage: String, CaseIterable {
        case oneEntryTooMany, oneEntryTooFew, reservedBitInAnEntry, allOnesFlagWithAnOffset
        case offsetOnTheGrid, tooManyEntriesButInUse
    }

    /// QEMU reads each bitmap not in use as it opens an image: a table of
    /// another size than the disk needs, or a malformed entry, refuses the
    /// open (with two different messages); a bitmap in use is not read.
    @Test(arguments: BitmapTableDamage.allCases)
    func aBitmapTableIsCheckedOnOpenAsQemuChecksIt(damage: BitmapTableDamage) throws {
        let directory = try Harness.temporaryDirectory("bitmaptable")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("b.qcow2").path
        // 100 MiB at one bit per 4 KiB is 3,200 bytes: a table of 7 entries.
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "100M"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", "-g", "4096", path, "b0"]).status == 0)
        let entry = try #require(try bitmapDirectoryOffset(path))
        let tableOffset = try u64(path, at: entry), tableSize = try u32(path, at: entry + 8)
        #expect(tableSize == 7)
        switch damage {
        case .oneEntryTooMany: try write(path, UInt64(tableSize + 1), width: 4, at: entry + 8)
        case .oneEntryTooFew: try write(path, UInt64(tableSize - 1), width: 4, at: entry + 8)
        case .reservedBitInAnEntry: try write(path, 1 << 1, width: 8, at: tableOffset + 8)
        case .allOnesFlagWithAnOffset: try write(path, 0x200 | 1, width: 8, at: tableOffset + 8)
        case .offsetOnTheGrid: try write(path, 0x200, width: 8, at: tableOffset + 8)
        case .tooManyEntriesButInUse:
            try write(path, UInt64(tableSize + 1), width: 4, at: entry + 8)
            try write(path, UInt64(try u32(path, at: entry + 12) | 1), width: 4, at: entry + 12)
        }
        try expectReadLikeQemuImg(path, qemuOpens: [.offsetOnTheGrid, .tooManyEntriesButInUse].contains(damage))
    }

    enum BitmapDirectoryDamage: String, CaseIterable {
        case directoryPastTheEnd, directoryRunningPastTheEnd, directoryPast2To63, directoryOffsetBeforeItsSize
        case extraDataPastTheDirectory, hugeExtraData
        case nameWithItsPadding, tablePast2To62, tablePast2To63
    }

    /// What lies past the end of the file reads as zeroes, short of where
    /// QEMU's reads must end (2^63 less a GiB), past which they fail; names
    /// end at a zero byte; an entry running past the directory is refused
    /// before its extra data, unless the sizes' sum wraps in QEMU's int.
    /// All as qemu-img reads them.
    @Test(arguments: BitmapDirectoryDamage.allCases)
    func aBitmapDirectoryIsReadAsQemuReadsIt(damage: BitmapDirectoryDamage) throws {
        let directory = try Harness.temporaryDirectory("bitmapdirectory")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("b.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", path, "b0"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", "--disable", path, "bitmap1"]).status == 0)
        let ext = try #require(try bitmapsExtensionOffset(path))
        let entry = try u64(path, at: ext + 16)
        let fileLength = UInt64(try FileManager.default.attributesOfItem(atPath: path)[.size] as! Int)
        switch damage {
        case .directoryPastTheEnd: try write(path, (fileLength / 65536 + 2) * 65536, width: 8, at: ext + 16)
        case .directoryRunningPastTheEnd: try write(path, 1024, width: 8, at: ext + 8)
        case .directoryPast2To63: try write(path, 1 << 63, width: 8, at: ext + 16)
        case .directoryOffsetBeforeItsSize:
            try write(path, 0, width: 8, at: ext + 8)
            try write(path, entry + 1, width: 8, at: ext + 16)
        case .extraDataPastTheDirectory: try write(path, 1 << 16, width: 4, at: entry + 20)
        case .hugeExtraData: try write(path, 1 << 31, width: 4, at: entry + 20)  // QEMU's int sum wraps
        case .nameWithItsPadding: try write(path, 3, width: 2, at: entry + 18)  // "b0" and a zero
        case .tablePast2To62: try write(path, 1 << 62, width: 8, at: entry)
        case .tablePast2To63: try write(path, 1 << 63, width: 8, at: entry)
        }
        try expectReadLikeQemuImg(path, qemuOpens: [.nameWithItsPadding, .tablePast2To62].contains(damage))
    }

    /// `info` and `check` of `path` by both tools: the same status and
    /// report, qemu-img's info opening the image or not as `qemuOpens` says.
    func expectReadLikeQemuImg(_ path: String, qemuOpens: Bool,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
        let qemu = try qemuImg(["info", path])
        #expect(qemu.status == (qemuOpens ? 0 : 1), "\(qemu.stderr)", sourceLocation: sourceLocation)
        let result = try img(["info", path])
        #expect(result.status == qemu.status, "\(result.stderr)", sourceLocation: sourceLocation)
        #expect(result.stdout == qemu.stdout, "\n\(result.stdout)--\n\(qemu.stdout)", sourceLocation: sourceLocation)
        #expect(result.stderrAsQemuImg() == qemu.stderr, "\n\(result.stderr)--\n\(qemu.stderr)",
                sourceLocation: sourceLocation)
        let check = try img(["check", path]), qemuCheck = try qemuImg(["check", path])
        #expect(check.status == qemuCheck.status, "\(check.stdout)\(check.stderr)--\n\(qemuCheck.stdout)\(qemuCheck.stderr)",
                sourceLocation: sourceLocation)
        #expect(check.stdout == qemuCheck.stdout, "\n\(check.stdout)--\n\(qemuCheck.stdout)", sourceLocation: sourceLocation)
    }

    /// An L2 entry off the cluster grid is judged when the walk reaches
    /// it, as QEMU judges it: `map` prints what it settled before, then
    /// QEMU's corruption event and "Could not read file metadata".
    @Test(arguments: [["--output=json"], []])
    func aMisalignedDataEntryStopsMapWhereQemuImgStops(options: [String]) throws {
        let directory = try Harness.temporaryDirectory("mapentry")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("m.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "4M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 8k", "-c", "write -z 8k 4k",
                                                 "-c", "write -P 2 12k 4k", path])
        // The fourth entry of the first L2 table: data at 0x200.
        let l2 = try u64(path, at: try u64(path, at: 40)) & 0x00ff_ffff_ffff_fe00
        try write(path, 1 << 63 | 0x200, width: 8, at: l2 + 3 * 8)
        let ours = try img(["map"] + options + [path]), theirs = try qemuImg(["map"] + options + [path])
        #expect(theirs.status == 1 && theirs.stderr.contains("Cluster allocation offset 0x200 unaligned"), "\(theirs.stderr)")
        #expect(ours.status == theirs.status, "\(ours.stderr)")
        #expect(ours.stdout == theirs.stdout, "\n\(ours.stdout)--\n\(theirs.stdout)")
        #expect(ours.stderrAsQemuImg() == theirs.stderr, "\n\(ours.stderr)--\n\(theirs.stderr)")
    }

    /// Each L1 entry's messages come before the next entry's, its L2
    /// table's in between, as qemu-img walks them (an earlier walk gave
    /// every L1 entry's first).
    @Test func checkReportsEachL1EntryWithItsL2TableLikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("l1order")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("o.qcow2").path
        // 4 KiB clusters: one L2 table maps 2 MiB, so 4 MiB takes two.
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "4M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 4k", "-c", "write -P 2 2M 4k", path])
        let l1 = try u64(path, at: 40)
        let first = try u64(path, at: l1), second = try u64(path, at: l1 + 8)
        // A reserved bit in both L1 entries and in the first table's entry.
        try write(path, first | 2, width: 8, at: l1)
        try write(path, second | 2, width: 8, at: l1 + 8)
        let l2 = first & 0x00ff_ffff_ffff_fe00
        try write(path, try u64(path, at: l2) | 2, width: 8, at: l2)
        let ours = try img(["check", path]), theirs = try qemuImg(["check", path])
        #expect(theirs.status == 2, "\(theirs.stdout)\(theirs.stderr)")
        #expect(ours.status == theirs.status, "\(ours.stderr)")
        #expect(ours.stdout == theirs.stdout, "\n\(ours.stdout)--\n\(theirs.stdout)")
        #expect(ours.stderrAsQemuImg() == theirs.stderr, "\n\(ours.stderr)--\n\(theirs.stderr)")
    }
}
