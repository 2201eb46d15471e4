import Foundation
import Testing

/// Damaged images on which a repair must not free clusters in use, or
/// write into one structure through another: `check` counts what qemu-img
/// counts and prints what it prints, and after `-r` the guest data is
/// what it was. Each shape was found by fuzzing, with guest data lost.
@Suite struct ImgCheckRepairSafetyTests: ImageToolRunner {
    let directory: URL

    init() throws {
        directory = try Harness.temporaryDirectory("repairsafety")
    }

    func path(_ name: String) -> String { directory.appendingPathComponent(name).path }

    /// An image with 1 MiB of pattern 0x5a at 0, and a copy to compare with.
    func makeImage(_ options: [String] = []) throws -> (image: String, original: String) {
        let image = path("image.qcow2")
        #expect(try qemuImg(["create", "-q", "-f", "qcow2"] + options + [image, "64M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 1M", image])
        return (image, path("original.qcow2"))
    }

    /// `check` (and then `check -r repair`) of `image` against qemu-img's
    /// on a copy: the same status, stdout and stderr each time.
    func expectChecksLikeQemuImg(_ image: String, repair: String) throws {
        let theirs = path("theirs.qcow2")
        try? FileManager.default.removeItem(atPath: theirs)
        try FileManager.default.copyItem(atPath: image, toPath: theirs)
        for arguments in [[String](), ["-r", repair]] {
            let ours = try img(["check"] + arguments + [image])
            let qemu = try qemuImg(["check"] + arguments + [theirs])
            #expect(ours.status == qemu.status, "\(arguments): \(ours.stderr)\n--\n\(qemu.stderr)")
            #expect(ours.stdout.replacingOccurrences(of: image, with: theirs) == qemu.stdout,
                    "\(arguments):\n\(ours.stdout)\n--\n\(qemu.stdout)")
            #expect(ours.stderrAsQemuImg(ours: image, theirs: theirs) == qemu.stderr,
                    "\(arguments):\n\(ours.stderr)\n--\n\(qemu.stderr)")
        }
    }

    /// qemu-img writing into new clusters leaves the 1 MiB at 0 as it was.
    func expectDataKept(_ image: String) throws {
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0xee 20M 64k", "-c", "write -P 0xee 21M 64k", image])
        let read = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-r", "-c", "read -P 0x5a 0 1M", image])
        #expect(read.status == 0 && !read.stdout.contains("verification failed"), "\(read.stdout)\(read.stderr)")
    }

    /// The file ends inside the last L2 table (QEMU never pads the file to
    /// a whole cluster): its entries are read with zeroes after the end
    /// and counted, not skipped, so `-r leaks` does not free the data.
    @Test func aLastL2TableTheFileEndsInsideIsCounted() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let (image, original) = try makeImage()
        // Move the L2 table to a new cluster at the end, then cut the file
        // just after its last entry in use (16 data clusters: 128 bytes).
        let clusterSize: UInt64 = 65536
        let l1 = try u64(image, at: 40)
        let oldTable = try u64(image, at: l1) & 0x00ff_ffff_ffff_fe00
        let end = try #require(try FileManager.default.attributesOfItem(atPath: image)[.size] as? UInt64)
        let newTable = (end + clusterSize - 1) / clusterSize * clusterSize
        try write(image, bytes: try read(image, at: oldTable, count: 128), at: newTable)
        try write(image, newTable | 1 << 63, width: 8, at: l1)
        let refcountBlock = try u64(image, at: try u64(image, at: 48))
        try write(image, 0, width: 2, at: refcountBlock + 2 * (oldTable / clusterSize))
        try write(image, 1, width: 2, at: refcountBlock + 2 * (newTable / clusterSize))
        try FileManager.default.copyItem(atPath: image, toPath: original)
        #expect(try qemuImg(["compare", image, original]).status == 0)
        try expectChecksLikeQemuImg(image, repair: "leaks")
        #expect(try qemuImg(["check", image]).status == 0)
        try expectDataKept(image)
    }

    /// Two L2 entries naming one cluster with 1-bit refcounts: it can count
    /// only 1, an overflow qemu-img reports and keeps at 1; 2 written into
    /// the bit would be 0, and the next allocation would take the cluster.
    @Test func aReferenceCountPastTheRefcountWidthStaysAtItsMaximum() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let (image, _) = try makeImage(["-o", "refcount_bits=1"])
        let l2 = try u64(image, at: try u64(image, at: 40)) & 0x00ff_ffff_ffff_fe00
        try write(image, try u64(image, at: l2), width: 8, at: l2 + 8 * 20)
        try expectChecksLikeQemuImg(image, repair: "all")
        let stderr = try img(["check", image]).stderr
        #expect(stderr.contains("ERROR: overflow cluster offset=0x"), "\(stderr)")
        try expectDataKept(image)
    }

    /// An L1 entry off the cluster grid: the table still counts for the
    /// clusters it overlaps and its entries are checked, as qemu-img does.
    @Test func aMisalignedL2TableStillCountsItsClusters() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let (image, _) = try makeImage()
        let l1 = try u64(image, at: 40)
        try write(image, try u64(image, at: l1) + 0x200, width: 8, at: l1)
        try expectChecksLikeQemuImg(image, repair: "all")
    }

    /// An L1 entry naming the L1 table: clearing its COPIED flag would
    /// write into the "L2 table" too. qemu-img's overlap check stops the
    /// repair and marks the image corrupt; so does Strata, and the guest
    /// data is unchanged.
    @Test func aRepairThatWouldWriteThroughAnotherStructureStops() throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let (image, original) = try makeImage()
        let l1 = try u64(image, at: 40)
        try write(image, l1 | 1 << 63, width: 8, at: l1)
        try FileManager.default.copyItem(atPath: image, toPath: original)
        let theirs = path("theirs.qcow2")
        try FileManager.default.copyItem(atPath: image, toPath: theirs)
        let repaired = try img(["check", "-r", "all", image])
        let qemu = try qemuImg(["check", "-r", "all", theirs])
        #expect(repaired.status == 1 && qemu.status == 1)
        #expect(repaired.stderr.contains("Check failed: Input/output error"), "\(repaired.stderr)")
        // Up to the fix that stops it, then the corrupt mark, as qemu-img.
        #expect(repaired.stderrAsQemuImg(ours: image, theirs: theirs) == qemu.stderr,
                "\(repaired.stderr)--\n\(qemu.stderr)")
        #expect(try qemuImg(["info", image]).stdout.contains("corrupt: true"))
        #expect(try qemuImg(["compare", image, original]).status == 0)
    }

    /// Entries qemu-img's check calls corrupt though reading them works:
    /// COPIED on a compressed entry, a compressed entry with subclusters
    /// allocated (with COPIED too), reserved bits in an L1 entry. Same
    /// report, same messages.
    @Test(arguments: ["copied-compressed", "compressed-bitmap", "copied-compressed-bitmap", "l1-reserved"])
    func entryChecksMatchQemuImg(damage: String) throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        let options = damage.hasSuffix("compressed-bitmap") ? ["-o", "extended_l2=on"] : []
        let (plain, _) = try makeImage(options)
        let image = path("damaged.qcow2")
        #expect(try qemuImg(["convert", "-c", "-O", "qcow2"] + options + [plain, image]).status == 0)
        let l1 = try u64(image, at: 40)
        let l2 = try u64(image, at: l1) & 0x00ff_ffff_ffff_fe00
        switch damage {
        case "copied-compressed": try write(image, try u64(image, at: l2) | 1 << 63, width: 8, at: l2)
        case "compressed-bitmap": try write(image, 1, width: 8, at: l2 + 8)
        case "copied-compressed-bitmap":
            try write(image, try u64(image, at: l2) | 1 << 63, width: 8, at: l2)
            try write(image, 1, width: 8, at: l2 + 8)
        default: try write(image, try u64(image, at: l1) | 8, width: 8, at: l1)
        }
        let ours = try img(["check", image])
        let theirs = try qemuImg(["check", image])
        #expect(theirs.status == 2)
        #expect(ours.status == theirs.status)
        #expect(ours.stdout == theirs.stdout, "\(ours.stdout)\n--\n\(theirs.stdout)")
        #expect(ours.stderr == theirs.stderr, "\(ours.stderr)\n--\n\(theirs.stderr)")
    }

    /// Misplaced entries and unknown header values get qemu-img's words: a
    /// misaligned entry that holds no data is a "Preallocated" cluster (and
    /// its COPIED flag is judged by the cluster it falls in), a refcount
    /// block far past the end is "outside image", a cluster that starts
    /// right at the end of the file is past it, a COPIED flag past the end
    /// is judged by the refcount stored for it, and an unknown encryption
    /// method is "Unsupported". An L1 entry with only flags names a table
    /// at offset 0 to qemu-img, which reads the header as one. A subcluster
    /// both allocated and zero, or allocated in a cluster without one, is
    /// corrupt. A misaligned snapshot table fails the check, snapshots or
    /// none.
    @Test(arguments: ["zero-misaligned", "data-misaligned", "block-far-outside", "data-at-end",
                      "data-past-end-counted", "unknown-encryption", "l1-flags-without-table", "subcluster-bitmaps",
                      "snapshot-table-misaligned"])
    func misplacedEntriesAreNamedAsQemuImgNamesThem(damage: String) throws {
        defer { try? FileManager.default.removeItem(at: directory) }
        // 4 KiB clusters for the L1 entry: the table has more than one.
        let options = ["l1-flags-without-table": ["-o", "cluster_size=4096"], "subcluster-bitmaps": ["-o", "extended_l2=on"]]
        let (image, _) = try makeImage(options[damage] ?? [])
        let l2 = try u64(image, at: try u64(image, at: 40)) & 0x00ff_ffff_ffff_fe00
        let slot = l2 + 8 * 3
        switch damage {
        case "zero-misaligned": try write(image, (try u64(image, at: slot) & 0x00ff_ffff_ffff_fe00) + 0x200 | 1, width: 8, at: slot)
        case "data-misaligned": try write(image, try u64(image, at: slot) + 0x200, width: 8, at: slot)
        case "block-far-outside": try write(image, 0xffff_ffff_ffff_0000, width: 8, at: try u64(image, at: 48) + 8)
        case "data-at-end", "data-past-end-counted":
            let end = try #require(try FileManager.default.attributesOfItem(atPath: image)[.size] as? UInt64)
            let target = damage == "data-at-end" ? end : end + 0x10_0000
            try write(image, target | 1 << 63, width: 8, at: slot)
            if damage == "data-past-end-counted" {
                try write(image, 1, width: 2, at: try u64(image, at: try u64(image, at: 48)) + 2 * (target >> 16))
            }
        case "l1-flags-without-table": try write(image, 0x80, width: 8, at: try u64(image, at: 40) + 8)
        case "snapshot-table-misaligned": try write(image, 0x30200, width: 8, at: 64)  // no snapshots
        case "subcluster-bitmaps":
            try write(image, try u64(image, at: l2 + 8) | 1 << 32, width: 8, at: l2 + 8)
            try write(image, 3, width: 8, at: l2 + 16 * 20 + 8)
        default: try write(image, 185, width: 4, at: 32)
        }
        let ours = try img(["check", image])
        let theirs = try qemuImg(["check", image])
        #expect(theirs.status != 0)
        #expect(ours.status == theirs.status)
        #expect(ours.stdout == theirs.stdout, "\(ours.stdout)\n--\n\(theirs.stdout)")
        #expect(ours.stderrAsQemuImg() == theirs.stderr, "\(ours.stderr)\n--\n\(theirs.stderr)")
    }
}
