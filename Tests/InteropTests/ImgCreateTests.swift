import Foundation
import Testing

/// `strata img create` refuses what qemu-img refuses, with its messages,
/// before touching any file, and rounds sizes as qemu-img does.
@Suite struct ImgCreateTests: ImageToolRunner {
    /// Each of these crashed, emptied the target, wrote an image no open
    /// accepts, or wrote an image over its own backing file.
    @Test(arguments: [
        (["-f", "raw", "TARGET", "8E"], "Invalid image size specified. Must be between 0 and 9223372036854775807."),
        (["-f", "raw", "TARGET", "99999999999E"], "Invalid image size specified. Must be between 0 and 9223372036854775807."),
        (["-f", "raw", "TARGET", "99999999999999999999999"], "Invalid image size specified. Must be between 0 and 9223372036854775807."),
        (["-f", "raw", "TARGET", "1.5"], "suffixes for\nstrata img: kilobytes, megabytes"),
        (["-f", "qcow2", "-o", "size=2M", "TARGET", "1M"], "The image size must be specified only once"),
        (["-f", "qcow2", "TARGET", "2E"], "The image size is too large for file format 'qcow2' (try using a larger cluster size)"),
        (["-f", "qcow2", "-o", "cluster_size=512", "TARGET", "1P"], "The image size is too large for file format 'qcow2'"),
        (["-f", "qcow2", "-o", "=", "TARGET", "1M"], "Invalid parameter ''"),
        (["-f", "qcow2", "-o", "a=1,==", "TARGET", "1M"], "Invalid parameter 'a'"),
        (["-f", "qcow2", "-o", "cluster_size=4k,", "TARGET", "1M"], "Invalid option list: cluster_size=4k,"),
        (["-f", "qcow2", "-o", "lazy_refcounts=", "TARGET", "1M"], "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
        (["-f", "qcow2", "-o", "backing_file=", "TARGET", "1M"], "Expected backing file name, got empty string"),
        (["-f", "qcow2", "-b", "", "-F", "qcow2", "TARGET", "1M"], "Expected backing file name, got empty string"),
        (["-f", "qcow2", "-b", "TARGET", "-F", "qcow2", "TARGET"], "Trying to create an image with the same filename as the backing file"),
        (["-f", "qcow2", "-b", "./TARGETNAME", "-F", "qcow2", "TARGET", "1M"], "Trying to create an image with the same filename as the backing file"),
        (["-f", "qcow2", "-b", "missing.qcow2", "-F", "qcow2", "TARGET", "1M"], "Could not open backing image"),
        (["-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", "-o", "preallocation=metadata", "TARGET", "1M"],
         "Backing file and preallocation can only be used at the same time if extended_l2 is on"),
    ])
    func refusedLikeQemuImgAndTheTargetIsLeftAlone(arguments: [String], message: String) throws {
        let directory = try Harness.temporaryDirectory("create-refused")
        defer { try? FileManager.default.removeItem(at: directory) }
        let target = directory.appendingPathComponent("target.img").path
        let before = Data("an existing file, not to be emptied".utf8)
        try before.write(to: URL(fileURLWithPath: target))
        // Relative backing names resolve against the target's directory.
        let resolved = arguments.map {
            $0.replacingOccurrences(of: "TARGETNAME", with: "target.img").replacingOccurrences(of: "TARGET", with: target)
        }
        let created = try img(["create"] + resolved)
        #expect(created.status == 1, "\(created.status) \(created.stderr)")
        #expect(created.stderr.contains(message), "\(created.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: target)) == before)
    }

    /// Booleans in any of qemu's spellings (on/off, yes/no, y/n,
    /// true/false), as qemu-img takes them.
    @Test(arguments: [("yes", true), ("y", true), ("true", true), ("no", false), ("n", false)])
    func booleanOptionsTakeQemusSpellings(value: String, expected: Bool) throws {
        let directory = try Harness.temporaryDirectory("create-bool")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("b.qcow2").path
        let created = try img(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=\(value),extended_l2=\(value)", path, "1M"])
        #expect(created.status == 0, "\(created.stderr)")
        let specific = (try qemuInfo(path)["format-specific"] as? [String: Any])?["data"] as? [String: Any] ?? [:]
        #expect(specific["lazy-refcounts"] as? Bool == expected)
        #expect(specific["extended-l2"] as? Bool == expected)
    }

    /// qemu-img rounds the size up to whole 512-byte sectors and shows the
    /// size asked for; `nokey` means `key=off`, `,,` a comma; `-u` skips
    /// opening the backing file, which must open otherwise.
    @Test func sizesRoundUpAndOptionsReadAsQemuImgReadsThem() throws {
        let directory = try Harness.temporaryDirectory("create-round")
        defer { try? FileManager.default.removeItem(at: directory) }
        for format in ["raw", "qcow2"] {
            let path = directory.appendingPathComponent("odd.\(format)").path
            let created = try img(["create", "-f", format, path, "1000"])
            #expect(created.status == 0, "\(created.stderr)")
            #expect(created.stdout.contains("size=1000"), "\(created.stdout)")
            let info = try qemuImg(["info", "--output=json", path])
            #expect(info.stdout.contains("\"virtual-size\": 1024"), "\(info.stdout)")
        }
        let off = directory.appendingPathComponent("off.qcow2").path
        let created = try img(["create", "-f", "qcow2", "-o", "lazy_refcounts,nolazy_refcounts", off, "1M"])
        #expect(created.status == 0, "\(created.stderr)")
        #expect(created.stdout.contains("lazy_refcounts=off"), "the later option wins: \(created.stdout)")
        // ",," is a comma within a value.
        let commaData = directory.appendingPathComponent("a,b.data").path
        let withComma = directory.appendingPathComponent("comma.qcow2").path
        let escaped = try img(["create", "-f", "qcow2", "-o", "data_file=" + commaData.replacingOccurrences(of: ",", with: ",,"),
                               withComma, "1M"])
        #expect(escaped.status == 0, "\(escaped.stderr)")
        #expect(FileManager.default.fileExists(atPath: commaData))
        let unsafe = directory.appendingPathComponent("unsafe.qcow2").path
        let skipped = try img(["create", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", unsafe, "1M"])
        #expect(skipped.status == 0, "\(skipped.stderr)")
        #expect(try qemuImg(["info", "-U", "--output=json", unsafe]).stdout.contains("\"backing-filename\": \"missing.qcow2\""))
    }

    /// preallocation=metadata writes its tables a piece at a time, as
    /// qemu-img does: a 2 GiB image of 512-byte clusters (40 MiB of L2
    /// tables and refcount blocks) is made within 24 MiB of data memory,
    /// which building it whole overran (an 8 GiB one took 190 MiB; a
    /// 64 TiB image at the defaults would take 10 GiB).
    @Test func preallocatedMetadataIsWrittenWithoutHoldingItAll() throws {
        let directory = try Harness.temporaryDirectory("create-stream")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("big.qcow2").path
        let created = try Harness.run("/usr/bin/prlimit", ["--data=\(24 << 20)", Harness.strata, "img", "create", "-q",
                                                         "-f", "qcow2", "-o", "preallocation=metadata,cluster_size=512",
                                                         path, "2G"])
        #expect(created.status == 0, "\(created.stderr)")
        let info = try qemuImg(["info", "--output=json", path])
        #expect(info.stdout.contains("\"virtual-size\": 2147483648"), "\(info.stdout)")
        // The last L1 entry names the last L2 table, whose last entry names
        // the last data cluster, which ends the file (qemu-img check of
        // the 8 GiB one, by hand: 16777216/16777216 allocated, no errors).
        let file = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? file.close() }
        func u64(at offset: UInt64) throws -> UInt64 {
            try file.seek(toOffset: offset)
            return (file.readData(ofLength: 8)).reduce(0) { $0 << 8 | UInt64($1) }
        }
        let l1Size = try u64(at: 32) & 0xffff_ffff
        let lastL2 = try u64(at: u64(at: 40) + (l1Size - 1) * 8)
        let lastData = try u64(at: (lastL2 & 0x00ff_ffff_ffff_fe00) + 63 * 8)
        let length = try file.seekToEnd()
        #expect(l1Size == 65_536)  // 2 GiB in L2 tables of 64 entries of 512 bytes
        #expect(lastL2 >> 63 == 1 && lastData >> 63 == 1, "COPIED flags")
        #expect(lastData & 0x00ff_ffff_ffff_fe00 == length - 512, "file of \(length) bytes")
    }

    /// Sizes read as qemu-img reads them: the same ones accepted, with the
    /// same result, and the same ones refused.
    @Test(arguments: ["512", "1k", "1g", "1G", "1.5M", "1.0", "0x100000", "1b", "3000", "+1k", " 1k", "1.k", "1.",
                      "1.5", "1.5b", "1e3", "0x1.8p4", "-1", "1Q", "", "1e"])
    func sizesReadAsQemuImgReadsThem(size: String) throws {
        let directory = try Harness.temporaryDirectory("create-size")
        defer { try? FileManager.default.removeItem(at: directory) }
        let ours = directory.appendingPathComponent("ours.raw").path
        let theirs = directory.appendingPathComponent("theirs.raw").path
        let mine = try img(["create", "-f", "raw", ours, size])
        let qemu = try qemuImg(["create", "-f", "raw", theirs, size])
        #expect(mine.status == qemu.status, "'\(size)': strata \(mine.status) \(mine.stderr), qemu-img \(qemu.status) \(qemu.stderr)")
        if qemu.status == 0 {
            let length = { (path: String) in try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int64 }
            #expect(try length(ours) == length(theirs), "'\(size)'")
        }
    }
}
