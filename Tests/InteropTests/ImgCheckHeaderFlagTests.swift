import Foundation
import Testing

/// `check -r` and the header's dirty and corrupt bits, as qemu-img: the
/// check (not the open) repairs a dirty lazy-refcounts image and reports
/// what it fixed, and a repair that leaves the image consistent clears
/// both bits, which is how an image flagged corrupt goes back into service;
/// persistent bitmaps come out of a repair as usable as they went in.
@Suite struct ImgCheckHeaderFlagTests: ImageToolRunner {
    func copy(_ source: String, _ name: String) throws -> String {
        let path = (source as NSString).deletingLastPathComponent + "/" + name
        try FileManager.default.copyItem(atPath: source, toPath: path)
        return path
    }

    /// qemu-img info's JSON for `path`, and its qcow2-specific part.
    func info(_ path: String) throws -> (all: [String: Any]?, qcow2: [String: Any]?) {
        let output = try qemuImg(["info", "-U", "--output=json", path])
        let object = try JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any]
        return (object, (object?["format-specific"] as? [String: Any])?["data"] as? [String: Any])
    }

    /// qemu-img info's "dirty-flag" and "corrupt" for `path`.
    func flags(_ path: String) throws -> (dirty: Bool?, corrupt: Bool?) {
        let (all, qcow2) = try info(path)
        return (all?["dirty-flag"] as? Bool, qcow2?["corrupt"] as? Bool)
    }

    /// A lazy-refcounts image that qemu-io aborted after writing three
    /// clusters: the dirty bit is set and the new clusters are counted 0.
    @Test func aDirtyLazyRefcountsImageIsRepairedByTheCheckLikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("dirtycheck")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = directory.appendingPathComponent("dirty.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", original, "16M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "write -P 2 1M 64k",
                                                 "-c", "abort", original])
        #expect(try flags(original).dirty == true)

        let ours = try copy(original, "ours.qcow2"), theirs = try copy(original, "theirs.qcow2")
        let repaired = try img(["check", "-r", "all", ours])
        let qemuRepaired = try qemuImg(["check", "-r", "all", theirs])
        #expect(qemuRepaired.status == 0 && qemuRepaired.stdout.contains("3 corruptions"), "\(qemuRepaired.stdout)")
        #expect(repaired.status == 0, "\(repaired.stdout)\(repaired.stderr)")
        #expect(repaired.stdout == qemuRepaired.stdout, "\n\(repaired.stdout)--\n\(qemuRepaired.stdout)")
        #expect(repaired.stderr == qemuRepaired.stderr, "\n\(repaired.stderr)--\n\(qemuRepaired.stderr)")
        #expect(try flags(ours).dirty == false)
        #expect(try qemuImg(["check", ours]).status == 0)
        #expect(try qemuImg(["compare", "-q", theirs, ours]).status == 0, "the data is unchanged")

        // -r leaks cannot repair clusters counted 0: it fails as qemu-img
        // does, writes nothing, and (unlike qemu-img) keeps the dirty bit,
        // so the next read-write open still repairs the counts.
        let leaksOnly = try copy(original, "leaks.qcow2")
        let before = try Data(contentsOf: URL(fileURLWithPath: leaksOnly))
        let gaveUp = try img(["check", "-r", "leaks", leaksOnly])
        let qemuGaveUp = try qemuImg(["check", "-r", "leaks", try copy(original, "qemu-leaks.qcow2")])
        #expect(gaveUp.status == 1 && gaveUp.stderr.contains("ERROR need to rebuild refcount structures"),
                "\(gaveUp.stdout)\(gaveUp.stderr)")
        #expect(gaveUp.stderrAsQemuImg() == qemuGaveUp.stderr,
                "\n\(gaveUp.stderr)--\n\(qemuGaveUp.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: leaksOnly)) == before, "untouched, dirty bit and all")
    }

    /// A dirty image whose repair leaves the refcounts right but a
    /// corruption no repair mends (a misaligned data entry): the dirty bit
    /// goes, as qemu-img clears it, and the file is qemu-img's byte for byte.
    @Test func aRepairThatLeavesTheCountsRightClearsTheDirtyBit() throws {
        let directory = try Harness.temporaryDirectory("dirtymisaligned")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = directory.appendingPathComponent("dirty.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", original, "16M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "abort", original])
        let l2 = try u64(original, at: try u64(original, at: 40)) & 0x00ff_ffff_ffff_fe00
        try write(original, try u64(original, at: l2 + 8) + 0x200, width: 8, at: l2 + 8)

        let ours = try copy(original, "ours.qcow2"), theirs = try copy(original, "theirs.qcow2")
        let repaired = try img(["check", "-r", "all", ours])
        let qemuRepaired = try qemuImg(["check", "-r", "all", theirs])
        #expect(repaired.status == 2 && qemuRepaired.status == 2, "\(repaired.stdout)\(repaired.stderr)")
        #expect(repaired.stdout == qemuRepaired.stdout, "\n\(repaired.stdout)--\n\(qemuRepaired.stdout)")
        #expect(try flags(ours).dirty == false)
        #expect(FileManager.default.contentsEqual(atPath: ours, andPath: theirs), "the same file")
    }

    /// A repair writes metadata only, so persistent bitmaps stay usable:
    /// not flagged in-use afterwards, as after qemu-img's repair (a bitmap
    /// in use is thrown away by backup tools, which then copy everything).
    @Test func aRepairLeavesPersistentBitmapsUsable() throws {
        let directory = try Harness.temporaryDirectory("bitmapcheck")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("bitmap.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", path, "b0"]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write 0 64k", path]).status == 0)
        for mode in ["leaks", "all"] {
            #expect(try img(["check", "-r", mode, path]).status == 0)
            let bitmaps = try info(path).qcow2?["bitmaps"] as? [[String: Any]]
            #expect(bitmaps?.first?["flags"] as? [String] == ["auto"], "\(mode): \(String(describing: bitmaps))")
        }
        #expect(try qemuImg(["check", path]).status == 0)
    }

    /// An image flagged corrupt whose metadata is sound: `check -r` clears
    /// the bit (qemu-img's way back), after which it opens read-write.
    @Test func aCorruptFlaggedImageThatChecksCleanIsPutBackIntoService() throws {
        let directory = try Harness.temporaryDirectory("corruptcheck")
        defer { try? FileManager.default.removeItem(at: directory) }
        let original = directory.appendingPathComponent("flagged.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", original, "16M"]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 3 0 64k", original]).status == 0)
        // The corrupt bit: bit 1 of the incompatible features (bytes 72-79).
        let handle = try #require(FileHandle(forUpdatingAtPath: original))
        try handle.seek(toOffset: 79)
        handle.write(Data([2]))
        try handle.close()
        #expect(try flags(original).corrupt == true)
        #expect(try img(["check", original]).status == 0, "a read-only check leaves the bit alone")
        #expect(try flags(original).corrupt == true)

        for mode in ["leaks", "all"] {
            let ours = try copy(original, "ours-\(mode).qcow2"), theirs = try copy(original, "theirs-\(mode).qcow2")
            let repaired = try img(["check", "-r", mode, ours])
            let qemuRepaired = try qemuImg(["check", "-r", mode, theirs])
            #expect(repaired.status == 0, "\(mode): \(repaired.stdout)\(repaired.stderr)")
            #expect(repaired.stdout == qemuRepaired.stdout, "\(mode):\n\(repaired.stdout)--\n\(qemuRepaired.stdout)")
            #expect(repaired.stderr == qemuRepaired.stderr, "\(mode):\n\(repaired.stderr)--\n\(qemuRepaired.stderr)")
            #expect(try flags(ours).corrupt == false, "\(mode)")
            #expect(try flags(theirs).corrupt == false, "\(mode)")
        }
    }
}
