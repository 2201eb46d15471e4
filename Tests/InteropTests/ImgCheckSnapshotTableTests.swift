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

    /// A 16 MiB image with 1 MiB written, snapshot "first", then 1 MiB
    /// more written over half of it.
    func makeImageWithSnapshot(_ path: String) throws {
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M", path])
        #expect(try qemuImg(["snapshot", "-c", "first", path]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 2 512k 1M", path])
    }

    @Test func incompleteEntriesAreFoundAndRepairedLikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("snaptable")
        defer { try? FileManager.default.removeItem(at: directory) }
        let ours = directory.appendingPathComponent("ours.qcow2").path
        let theirs = directory.appendingPathComponent("theirs.qcow2").path
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
        let directory = try Harness.temporaryDirectory("snapl1")
        defer { try? FileManager.default.removeItem(at: directory) }
        let ours = directory.appendingPathComponent("ours.qcow2").path
        let theirs = directory.appendingPathComponent("theirs.qcow2").path
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
}
