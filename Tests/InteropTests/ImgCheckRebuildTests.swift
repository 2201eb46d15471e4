import Foundation
import Testing

/// `check -r all` on refcount structures that cannot be repaired in place:
/// a table past the end of the file, a block past the end, one block named
/// twice, a block on top of an L2 table, clusters in use counted 0. Strata rebuilds them as qemu-img
/// does (same report, same image end), the data reads back unchanged, and
/// qemu-img finds the result clean.
@Suite struct ImgCheckRebuildTests: ImageToolRunner {
    /// A 64 MiB image with 1 MiB written: header, refcount table (0x10000),
    /// its block (0x20000), L1, one L2 table (0x40000), 16 data clusters.
    func pristine(in directory: URL) throws -> String {
        let path = directory.appendingPathComponent("pristine.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "64M"]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 1M", path]).status == 0)
        return path
    }

    /// A copy of `source` with the big-endian u64 at `offset` replaced.
    func damaged(_ source: String, _ name: String, setting value: UInt64, at offset: UInt64) throws -> String {
        let path = (source as NSString).deletingLastPathComponent + "/" + name
        try? FileManager.default.removeItem(atPath: path)
        try FileManager.default.copyItem(atPath: source, toPath: path)
        let handle = try #require(FileHandle(forUpdatingAtPath: path))
        try handle.seek(toOffset: offset)
        handle.write(Data((0..<8).map { UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * $0)) }))
        try handle.close()
        return path
    }

    @Test(arguments: [
        ("table past the end", UInt64(48), UInt64(1) << 30),
        ("block past the end", 0x10000, 0x100_0000),
        ("block named twice", 0x10008, 0x20000),
        ("block on the L2 table", 0x10008, 0x40000),
        ("clusters in use counted 0", 0x20006, 0),  // the L1, L2 and two data clusters
    ])
    func repairAllRebuildsTheRefcountStructureLikeQemuImg(damage: String, offset: UInt64, value: UInt64) throws {
        let directory = try Harness.temporaryDirectory("rebuild")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = try pristine(in: directory)
        let ours = try damaged(original, "ours.qcow2", setting: value, at: offset)
        let theirs = try damaged(original, "theirs.qcow2", setting: value, at: offset)
        let plain = try img(["check", ours])
        #expect(plain.status == 2, "\(damage): \(plain.stdout)\(plain.stderr)")
        let qemuPlain = try qemuImg(["check", theirs])
        #expect(plain.stdout == qemuPlain.stdout, "\(damage):\n\(plain.stdout)--\n\(qemuPlain.stdout)")
        #expect(plain.stderr == qemuPlain.stderr, "\(damage):\n\(plain.stderr)--\n\(qemuPlain.stderr)")

        let repaired = try img(["check", "-r", "all", ours])
        let qemuRepaired = try qemuImg(["check", "-r", "all", theirs])
        #expect(qemuRepaired.status == 0)
        #expect(repaired.status == 0, "\(damage): \(repaired.stdout)\(repaired.stderr)")
        // For a block past the end qemu-img first grows the file to take
        // the block in (16 MiB here), then counts its missing refcount as
        // one more corruption; Strata does not grow a file to wherever a
        // damaged entry points. Everything else is the same.
        let expected = damage == "block past the end"
            ? qemuRepaired.stdout.replacingOccurrences(of: "    22 corruptions", with: "    21 corruptions")
            : qemuRepaired.stdout
        #expect(repaired.stdout == expected, "\(damage):\n\(repaired.stdout)--\n\(qemuRepaired.stdout)")
        // Without the grown file, the block stays an error, and the cluster
        // it took in (256) is neither counted nor freed.
        let expectedStderr = damage == "block past the end"
            ? qemuRepaired.stderr
                .replacingOccurrences(of: "Repairing refcount block 0 is outside image", with: "ERROR refcount block 0 is outside image")
                .replacingOccurrences(of: "ERROR cluster 256 refcount=0 reference=1\n", with: "")
                .replacingOccurrences(of: "Repairing cluster 256 refcount=1 reference=0\n", with: "")
            : qemuRepaired.stderr
        #expect(repaired.stderr == expectedStderr, "\(damage):\n\(repaired.stderr)--\n\(qemuRepaired.stderr)")
        let after = try qemuImg(["check", ours])
        #expect(after.status == 0, "\(damage): \(after.stdout)\(after.stderr)")
        #expect(try qemuImg(["compare", "-q", original, ours]).status == 0, "\(damage): the data is unchanged")
        // The rebuilt structure takes allocations: qemu-io writes, and both
        // tools still find the image clean.
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 7 32M 2M", ours]).status == 0)
        #expect(try qemuImg(["check", ours]).status == 0)
        #expect(try img(["check", ours]).status == 0)
    }

    /// Where qemu-img gives up, so does Strata (exit 1), and the image is
    /// left as it was: with only `-r leaks`, a lost table or clusters in
    /// use counted 0.
    @Test func repairsQemuImgRefusesFailWithExitOne() throws {
        let directory = try Harness.temporaryDirectory("norebuild")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = try pristine(in: directory)
        for (name, offset, value, mode) in [("lost.qcow2", UInt64(48), UInt64(1) << 30, "leaks"),
                                            ("zeroed.qcow2", 0x20006, 0, "leaks")] {
            let ours = try damaged(original, name, setting: value, at: offset)
            let theirs = try damaged(original, "qemu-" + name, setting: value, at: offset)
            let before = try Data(contentsOf: URL(fileURLWithPath: ours))
            #expect(try qemuImg(["check", "-r", mode, theirs]).status == 1)
            let result = try img(["check", "-r", mode, ours])
            #expect(result.status == 1, "\(name): \(result.stdout)\(result.stderr)")
            #expect(try Data(contentsOf: URL(fileURLWithPath: ours)) == before, "\(name) untouched")
        }
    }

    /// A refcount block qemu-img cannot read at all, misaligned or beyond
    /// any offset a file reaches: each cluster it covers is a check error
    /// ("Can't get refcount …", exit 1), a misaligned one marks the image
    /// corrupt once opened for a repair, and `-r all` rebuilds past the
    /// far one. Status, output and the file afterwards are qemu-img's.
    @Test(arguments: [(UInt64(0x20200), "check"), (0x20200, "leaks"),
                      (0x8000_0000_0002_0000, "check"), (0x8000_0000_0002_0000, "leaks"), (0x8000_0000_0002_0000, "all"),
                      (0x20208, "check"), (0x20208, "leaks")])  // reserved bits too
    func unreadableRefcountBlocksAreReportedAsQemuImgReportsThem(entry: UInt64, mode: String) throws {
        let directory = try Harness.temporaryDirectory("unreadable")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = try pristine(in: directory)
        let ours = try damaged(original, "ours.qcow2", setting: entry, at: 0x10000)
        let theirs = try damaged(original, "theirs.qcow2", setting: entry, at: 0x10000)
        let arguments = mode == "check" ? ["check"] : ["check", "-r", mode]
        let result = try img(arguments + [ours])
        let qemu = try qemuImg(arguments + [theirs])
        let context = "\(String(entry, radix: 16)) \(mode)"
        #expect(result.status == qemu.status, "\(context)")
        #expect(result.stdout.replacingOccurrences(of: ours, with: theirs) == qemu.stdout,
                "\(context):\n\(result.stdout)--\n\(qemu.stdout)")
        #expect(result.stderrAsQemuImg(ours: ours, theirs: theirs) == qemu.stderr,
                "\(context):\n\(result.stderr)--\n\(qemu.stderr)")
        #expect(FileManager.default.contentsEqual(atPath: ours, andPath: theirs), "\(context): the same file")
    }

    /// qemu-img's `-r all` gives up on a misaligned refcount block: it
    /// marked the image corrupt on reading the block, and then refuses its
    /// own rebuild's writes (exit 1). Strata's rebuild does not need the
    /// block, and leaves an image qemu-img calls clean, with the same data.
    @Test func aMisalignedRefcountBlockIsRebuiltWhereQemuImgGivesUp() throws {
        let directory = try Harness.temporaryDirectory("misalignedblock")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = try pristine(in: directory)
        let ours = try damaged(original, "ours.qcow2", setting: 0x20200, at: 0x10000)
        let theirs = try damaged(original, "theirs.qcow2", setting: 0x20200, at: 0x10000)
        #expect(try qemuImg(["check", "-r", "all", theirs]).status == 1)
        let repaired = try img(["check", "-r", "all", ours])
        #expect(repaired.status == 0, "\(repaired.stdout)\(repaired.stderr)")
        #expect(repaired.stderr.contains("Rebuilding refcount structure"))
        let after = try qemuImg(["check", ours])
        #expect(after.status == 0, "\(after.stdout)\(after.stderr)")
        #expect(try qemuImg(["compare", "-q", original, ours]).status == 0, "the data is unchanged")
    }

    /// Damage a server must refuse but qemu-img checks, as Strata's check
    /// does too: an L1 table the file ends inside (it reads as zeroes
    /// there), an L1 table at offset 0 (the header read as one), and no
    /// refcount table at all (every count lost; `-r all` rebuilds them).
    /// Status, output and, for the repair, the file are qemu-img's.
    @Test(arguments: ["l1-cut-off", "l1-at-zero", "no-refcount-table", "no-refcount-table -r all"])
    func damageQemuImgChecksRatherThanRefusesIsChecked(damage: String) throws {
        let directory = try Harness.temporaryDirectory("checkable")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = try pristine(in: directory)
        let ours = directory.appendingPathComponent("ours.qcow2").path
        switch damage {
        case "l1-cut-off":
            // 4 KiB clusters: the L1 table is the file's fourth cluster.
            #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", ours, "8M"]).status == 0)
            let handle = try #require(FileHandle(forUpdatingAtPath: ours))
            try handle.truncate(atOffset: 12288)
            try handle.close()
        case "l1-at-zero": _ = try damaged(original, "ours.qcow2", setting: 0, at: 40)
        default:
            _ = try damaged(original, "ours.qcow2", setting: 0x10000, at: 48)
            let handle = try #require(FileHandle(forUpdatingAtPath: ours))
            try handle.seek(toOffset: 56)
            handle.write(Data([0, 0, 0, 0]))
            try handle.close()
        }
        let theirs = directory.appendingPathComponent("theirs.qcow2").path
        try FileManager.default.copyItem(atPath: ours, toPath: theirs)
        let arguments = damage.hasSuffix("-r all") ? ["check", "-r", "all"] : ["check"]
        let result = try img(arguments + [ours])
        let qemu = try qemuImg(arguments + [theirs])
        #expect(result.status == qemu.status, "\(damage): \(result.stdout)\(result.stderr)")
        #expect(result.stdout.replacingOccurrences(of: ours, with: theirs) == qemu.stdout,
                "\(damage):\n\(result.stdout)--\n\(qemu.stdout)")
        #expect(result.stderrAsQemuImg(ours: ours, theirs: theirs) == qemu.stderr,
                "\(damage):\n\(result.stderr)--\n\(qemu.stderr)")
        if damage.hasSuffix("-r all") {
            #expect(try qemuImg(["check", ours]).status == 0)
            #expect(try qemuImg(["compare", "-q", original, ours]).status == 0, "the data is unchanged")
        }
    }
}
