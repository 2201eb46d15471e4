import Foundation
import Testing

/// `check` of the snapshot table: version 3 entries written without extra
/// data (as QEMU before 4.2 wrote them) are corruptions for qemu-img, and
/// `-r all` writes the table again; Strata reports and repairs them alike.
@Suite struct ImgCheckSnapshotTableTests: ImageToolRunner {
    /// Rewrites every entry of the snapshot table of `path` without its
    /// extra data, in place (the table only shrinks).
    func dropExtraData(_ path: String) throws {
        let count = Int(try u32(path, at: 60))
        let offset = try u64(path, at: 64)
        let old = try read(path, at: offset, count: 65536)
        let number = { (at: Int, width: Int) in old[at..<at + width].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        var position = 0
        var table: [UInt8] = []
        for _ in 0..<count {
            let idSize = Int(number(position + 12, 2))
            let nameSize = Int(number(position + 14, 2))
            let extraSize = Int(number(position + 36, 4))
            var entry = Array(old[position..<position + 36]) + [0, 0, 0, 0]
            let names = position + 40 + extraSize
            entry += old[names..<names + idSize + nameSize]
            entry += [UInt8](repeating: 0, count: (8 - entry.count % 8) % 8)
            table += entry
            position = (position + 40 + extraSize + idSize + nameSize + 7) / 8 * 8
        }
        try write(path, bytes: table + [UInt8](repeating: 0, count: position - table.count), at: offset)
    }

    /// A scratch directory with the image Strata checks and qemu-img's copy.
    func scratchPair(_ name: String) throws -> (directory: URL, ours: String, theirs: String) {
        let directory = try Harness.temporaryDirectory(name)
        return (directory, directory.appendingPathComponent("ours.qcow2").path,
                directory.appendingPathComponent("theirs.qcow2").path)
    }

    /// A 16 MiB image with 1 MiB written, snapshot "first", then 1 MiB
    /// more written over half of it.
    func makeImageWithSnapshot(_ path: String) throws {
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M", path])
        #expect(try qemuImg(["snapshot", "-c", "first", path]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 2 512k 1M", path])
    }

    @Test func incompleteEntriesAreFoundAndRepairedLikeQemuImg() throws {
        let (directory, ours, theirs) = try scratchPair("snaptable")
        defer { try? FileManager.default.removeItem(at: directory) }
        try makeImageWithSnapshot(ours)
        #expect(try qemuImg(["snapshot", "-c", "second", ours]).status == 0)
        try dropExtraData(ours)
        try FileManager.default.copyItem(atPath: ours, toPath: theirs)

        let found = try img(["check", ours])
        let qemuFound = try qemuImg(["check", theirs])
        #expect(qemuFound.status == 2, "qemu-img: \(qemuFound.stderr)")
        #expect(found.status == 2)
        #expect(found.stdout == qemuFound.stdout, "\(found.stdout)\n--\n\(qemuFound.stdout)")
        #expect(found.stderr == qemuFound.stderr, "\(found.stderr)\n--\n\(qemuFound.stderr)")
        for index in 0..<2 {
            #expect(found.stderr.contains("ERROR snapshot table entry \(index) is incomplete"), "\(found.stderr)")
        }

        let repaired = try img(["check", "-r", "all", ours])
        let qemuRepaired = try qemuImg(["check", "-r", "all", theirs])
        #expect(qemuRepaired.status == 0)
        #expect(repaired.status == 0, "\(repaired.stderr)")
        #expect(repaired.stdout == qemuRepaired.stdout, "\(repaired.stdout)\n--\n\(qemuRepaired.stdout)")
        #expect(repaired.stderr == qemuRepaired.stderr, "\(repaired.stderr)\n--\n\(qemuRepaired.stderr)")
        #expect(try qemuImg(["check", ours]).status == 0)
        #expect(FileManager.default.contentsEqual(atPath: ours, andPath: theirs), "the same file")

        // The same snapshots, with the same data, as qemu-img's repair left.
        let snapshots = { (path: String) throws -> String in
            let info = try self.qemuImg(["info", "--output=json", path]).stdout
            let object = try JSONSerialization.jsonObject(with: Data(info.utf8)) as? [String: Any] ?? [:]
            let data = try JSONSerialization.data(withJSONObject: object["snapshots"] ?? [], options: [.sortedKeys])
            return String(decoding: data, as: UTF8.self)
        }
        #expect(try snapshots(ours) == snapshots(theirs))
        #expect(try snapshots(ours).contains("\"second\""))
        for name in ["first", "second"] {
            let mine = directory.appendingPathComponent("ours-\(name).raw").path
            let qemu = directory.appendingPathComponent("theirs-\(name).raw").path
            for (image, raw) in [(ours, mine), (theirs, qemu)] {
                let converted = try qemuImg(["convert", "-l", "snapshot.name=\(name)", "-O", "raw", image, raw])
                #expect(converted.status == 0, "\(converted.stderr)")
            }
            #expect(FileManager.default.contentsEqual(atPath: mine, andPath: qemu), "snapshot \(name)")
        }
    }

    /// A snapshot whose L1 table offset is misaligned is a corruption and
    /// its tables are not walked: what they alone held is leaked, and
    /// every mode reports, repairs and leaves the file as qemu-img does.
    @Test(arguments: ["check", "leaks", "all"])
    func aSnapshotWithAMisalignedL1TableIsReportedLikeQemuImg(mode: String) throws {
        let (directory, ours, theirs) = try scratchPair("snapl1")
        defer { try? FileManager.default.removeItem(at: directory) }
        try makeImageWithSnapshot(ours)
        let table = try u64(ours, at: 64)
        try write(ours, try u64(ours, at: table) + 0x200, width: 8, at: table)
        try FileManager.default.copyItem(atPath: ours, toPath: theirs)
        let arguments = mode == "check" ? ["check"] : ["check", "-r", mode]
        let result = try img(arguments + [ours])
        let qemu = try qemuImg(arguments + [theirs])
        #expect(result.status == qemu.status && qemu.status != 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.replacingOccurrences(of: ours, with: theirs) == qemu.stdout, "\n\(result.stdout)--\n\(qemu.stdout)")
        #expect(result.stderrAsQemuImg(ours: ours, theirs: theirs) == qemu.stderr, "\n\(result.stderr)--\n\(qemu.stderr)")
        #expect(FileManager.default.contentsEqual(atPath: ours, andPath: theirs), "the same file")
    }

    /// Damage a server refuses and qemu-img's check reads past. To the
    /// table: more entries than the file holds, read as zeroes past its
    /// end, each then incomplete; more extra data than QEMU allows, which
    /// only `-r all` cuts (in entry 0 the rest of the table is then read
    /// from the wrong place, as QEMU reads it); extra data claiming 4 GiB,
    /// which takes the table past QEMU's 2 GiB, so that `-r all` drops the
    /// entry and those after it (in entry 0: every one, and the header then
    /// names no table). To an entry's L1 table, which the check judges (no repair
    /// mends it): off the 512-byte grid, too large, past anything a file
    /// holds, or past 2^63 and off the cluster grid.
    enum TableDamage: String, CaseIterable, Sendable {
        case entriesPastTheEnd, tooMuchExtraData, tooMuchExtraDataFirst, tableTooBig, tableTooBigFirst
        case l1OffTheGrid, l1TooLarge, l1PastAnyFile, l1PastFileOffsetsOffTheGrid

        /// Whether `-r all` leaves the image clean.
        var repairable: Bool { !rawValue.hasPrefix("l1") }
    }

    @Test(arguments: TableDamage.allCases, ["check", "leaks", "all"])
    func aDamagedTableIsCheckedAndRepairedLikeQemuImg(damage: TableDamage, mode: String) throws {
        let (directory, ours, theirs) = try scratchPair("snaptable")
        defer { try? FileManager.default.removeItem(at: directory) }
        try makeImageWithSnapshot(ours)
        #expect(try qemuImg(["snapshot", "-c", "second", ours]).status == 0)
        let table = try u64(ours, at: 64)
        switch damage {
        case .entriesPastTheEnd:
            try write(ours, 100, width: 4, at: 60)
        case .tooMuchExtraData, .tooMuchExtraDataFirst, .tableTooBig, .tableTooBigFirst:
            // Entry 0 is 40 bytes, 24 of extra data, id "1" and "first": 72.
            let entry = [.tooMuchExtraDataFirst, .tableTooBigFirst].contains(damage) ? table : table + 72
            let size: UInt64 = [.tooMuchExtraData: 1500, .tooMuchExtraDataFirst: 2000][damage] ?? 0xffff_ffff
            try write(ours, size, width: 4, at: entry + 36)
        case .l1OffTheGrid:
            try write(ours, try u64(ours, at: table) + 0x10, width: 8, at: table)
        case .l1TooLarge:
            try write(ours, 0x1000_0000, width: 4, at: table + 8)
        case .l1PastAnyFile:
            try write(ours, 0x7878_0000_0000_0000, width: 8, at: table)
        case .l1PastFileOffsetsOffTheGrid:
            try write(ours, 0x8000_0000_0000_0200, width: 8, at: table)
        }
        try FileManager.default.copyItem(atPath: ours, toPath: theirs)
        let arguments = mode == "check" ? ["check"] : ["check", "-r", mode]
        let result = try img(arguments + [ours])
        let qemu = try qemuImg(arguments + [theirs])
        #expect(result.status == qemu.status, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.replacingOccurrences(of: ours, with: theirs) == qemu.stdout, "\n\(result.stdout)--\n\(qemu.stdout)")
        let stderr = result.stderrAsQemuImg(ours: ours, theirs: theirs)
            .replacingOccurrences(of: "strata img check", with: "qemu-img check")
        #expect(stderr == qemu.stderr, "\n\(result.stderr)--\n\(qemu.stderr)")
        // Byte for byte, the old table's cluster punched out as QEMU does.
        #expect(FileManager.default.contentsEqual(atPath: ours, andPath: theirs), "the same file")
        guard mode == "all", damage.repairable else {
            #expect(qemu.status != 0)
            return
        }
        // Clean, with the snapshots qemu-img's repair left.
        #expect(qemu.status == 0)
        #expect(try qemuImg(["check", ours]).status == 0)
        let snapshots = { (path: String) throws -> String in
            try self.qemuImg(["snapshot", "-l", path]).stdout.replacingOccurrences(of: path, with: "")
        }
        let (mine, qemuImgs) = (try snapshots(ours), try snapshots(theirs))
        #expect(mine == qemuImgs, "\n\(mine)--\n\(qemuImgs)")
    }

    /// A table that ends a cluster or more past the end of the file: the
    /// check reports it as qemu-img does; a repair refuses and leaves the
    /// file as it was (here qemu-img's `-r all` fails on its own overlap
    /// check: its new table lands on the old one past the end).
    @Test func aTableFarPastTheEndIsCheckedButNotRepaired() throws {
        let (directory, ours, theirs) = try scratchPair("snaptable")
        defer { try? FileManager.default.removeItem(at: directory) }
        try makeImageWithSnapshot(ours)
        // The last snapshot's table is the file's last cluster; 5,000
        // entries of 40 bytes reach 3 clusters past it.
        #expect(try qemuImg(["snapshot", "-c", "second", ours]).status == 0)
        try write(ours, 5000, width: 4, at: 60)
        try FileManager.default.copyItem(atPath: ours, toPath: theirs)
        let result = try img(["check", ours])
        let qemu = try qemuImg(["check", theirs])
        #expect(qemu.status == 2 && result.status == 2, "\(result.stderr)")
        #expect(result.stdout.replacingOccurrences(of: ours, with: theirs) == qemu.stdout)
        #expect(result.stderrAsQemuImg(ours: ours, theirs: theirs) == qemu.stderr)
        #expect(qemu.stderr.contains("exceeding the end of the file by one cluster or more"))
        let before = try Data(contentsOf: URL(fileURLWithPath: ours))
        for mode in ["leaks", "all"] {
            let repair = try img(["check", "-r", mode, ours])
            #expect(repair.status == 1 && repair.stderr.contains("Snapshot table truncated"), "\(repair.stderr)")
        }
        #expect(try Data(contentsOf: URL(fileURLWithPath: ours)) == before)
        let qemuRepair = try qemuImg(["check", "-r", "all", theirs])
        #expect(qemuRepair.status == 1 && qemuRepair.stderr.contains("overlaps with snapshot table"), "\(qemuRepair.stderr)")
    }
}
