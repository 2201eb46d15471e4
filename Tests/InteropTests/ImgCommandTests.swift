import Foundation
import Testing

/// `strata img` against qemu-img: what create writes passes `qemu-img
/// check` with the options asked for, and info/map/check agree with
/// qemu-img on images qemu-img made.
@Suite struct ImgCommandTests: ImageToolRunner {
    @Test(arguments: [
        ([], "64M"),
        (["-o", "cluster_size=512"], "16M"),
        (["-o", "cluster_size=2M"], "1G"),
        (["-o", "lazy_refcounts=on,refcount_bits=1"], "1G"),
        (["-o", "refcount_bits=64,compression_type=zstd"], "256M"),
        (["-o", "extended_l2=on,cluster_size=128k"], "10G"),
        (["-o", "preallocation=metadata,cluster_size=4k"], "64M"),
        (["-o", "compat=0.10"], "64M"),
        (["-o", "data_file=DATA,data_file_raw=on"], "32M"),
        (["-o", "cluster_size=512,refcount_bits=1"], "3G"),
        (["-o", "preallocation=falloc"], "32M"),
        (["-o", "preallocation=full,cluster_size=16k"], "8M"),
    ])
    func createdImagesPassQemuImgCheck(options: [String], size: String) throws {
        let directory = try Harness.temporaryDirectory("create")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("new.qcow2").path
        // Relative data file names are relative to the current directory
        // (as in qemu-img): use an absolute one.
        let dataPath = directory.appendingPathComponent("new.data").path
        let resolved = options.map { $0.replacingOccurrences(of: "DATA", with: dataPath) }
        let created = try img(["create", "-f", "qcow2"] + resolved + [path, size])
        #expect(created.status == 0, "\(created.stderr)")
        let check = try qemuImg(["check", path])
        #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)")
        let info = try qemuInfo(path)
        let specific = (info["format-specific"] as? [String: Any])?["data"] as? [String: Any] ?? [:]
        let text = resolved.joined(separator: ",")
        if text.contains("lazy_refcounts=on") { #expect(specific["lazy-refcounts"] as? Bool == true) }
        if text.contains("refcount_bits=1,") || text.hasSuffix("refcount_bits=1") { #expect(specific["refcount-bits"] as? Int == 1) }
        if text.contains("refcount_bits=64") { #expect(specific["refcount-bits"] as? Int == 64) }
        if text.contains("zstd") { #expect(specific["compression-type"] as? String == "zstd") }
        if text.contains("extended_l2=on") { #expect(specific["extended-l2"] as? Bool == true) }
        if text.contains("compat=0.10") { #expect(specific["compat"] as? String == "0.10") }
        if text.contains("cluster_size=512") { #expect(info["cluster-size"] as? Int == 512) }
        if text.contains("cluster_size=2M") { #expect(info["cluster-size"] as? Int == 2 << 20) }
        if text.contains("data_file") { #expect(specific["data-file"] as? String == dataPath) }
        #expect(info["virtual-size"] as? Int64 == Int64(ImageSizeForTests.bytes(size)))
        if text.contains("preallocation=f") {
            // Data clusters are allocated in the file too, as qemu-img's are.
            let theirs = directory.appendingPathComponent("theirs.qcow2").path
            #expect(try qemuImg(["create", "-f", "qcow2"] + resolved + [theirs, size]).status == 0)
            let mine = try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int64 ?? 0
            let qemus = try FileManager.default.attributesOfItem(atPath: theirs)[.size] as? Int64 ?? 0
            #expect(mine == qemus, "file length \(mine), qemu-img's \(qemus)")
            #expect(try qemuImg(["map", "--output=json", path]).stdout == qemuImg(["map", "--output=json", theirs]).stdout
                        .replacingOccurrences(of: theirs, with: path))
        }
        // qemu-io can use it, and it still checks clean afterwards.
        let write = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 0 1M", path])
        #expect(write.status == 0, "\(write.stderr)")
        #expect(try qemuImg(["check", path]).status == 0)
    }

    @Test func backingFilesAndRawImages() throws {
        let directory = try Harness.temporaryDirectory("create-b")
        defer { try? FileManager.default.removeItem(at: directory) }
        let base = directory.appendingPathComponent("base.raw").path
        #expect(try img(["create", "-f", "raw", base, "32M"]).status == 0)
        #expect(try qemuInfo(base)["virtual-size"] as? Int64 == 32 << 20)
        let overlay = directory.appendingPathComponent("top.qcow2").path
        let created = try img(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", overlay])
        #expect(created.status == 0, "\(created.stderr)")
        let info = try qemuInfo(overlay)
        #expect(info["backing-filename"] as? String == "base.raw")
        #expect(info["backing-filename-format"] as? String == "raw")
        #expect(info["virtual-size"] as? Int64 == 32 << 20, "size taken from the backing file")
        #expect(try qemuImg(["check", overlay]).status == 0)
        let noFormat = try img(["create", "-f", "qcow2", "-b", "base.raw", overlay + "2", "32M"])
        #expect(noFormat.status != 0 && noFormat.stderr.contains("backing format"))
        let badOption = try img(["create", "-f", "qcow2", "-o", "cluster_size=3000", overlay + "3", "1M"])
        #expect(badOption.status != 0 && badOption.stderr.contains("Cluster size"))
        let badSize = try img(["create", "-f", "qcow2", overlay + "4", "12Q"])
        #expect(badSize.status != 0 && badSize.stderr.contains("Invalid image size"))
        // A raw image has no checks (63); opened for a repair, its probed
        // format gets qemu-img's warning first.
        for arguments in [["check"], ["check", "-r", "leaks"]] {
            let ours = try img(arguments + [base])
            let theirs = try qemuImg(arguments + [base])
            #expect(ours.status == 63 && theirs.status == 63)
            #expect(ours.stderrAsQemuImg(ours: base, theirs: base) == theirs.stderr, "\(arguments)")
        }
    }

    /// Extended L2: zero and unallocated subclusters of a cluster with host
    /// space carry its offset in qemu-img's map, alone and over a backing file.
    @Test func mapOfSubclustersAgreesWithQemuImg() throws {
        let directory = try Harness.temporaryDirectory("subclusters")
        defer { try? FileManager.default.removeItem(at: directory) }
        let base = directory.appendingPathComponent("base.qcow2").path
        let top = directory.appendingPathComponent("top.qcow2").path
        #expect(try qemuImg(["create", "-f", "qcow2", base, "4M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 9 0 4M", base])
        for (image, backing) in [(directory.appendingPathComponent("alone.qcow2").path, nil as String?), (top, "base.qcow2")] {
            var create = ["create", "-f", "qcow2", "-o", "extended_l2=on", image, "4M"]
            if let backing { create += ["-b", backing, "-F", "qcow2"] }
            #expect(try qemuImg(create).status == 0)
            _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 0 2k",
                                                     "-c", "write -P 2 128k 64k", "-c", "write -z 130k 4k",
                                                     "-c", "write -z 1M 64k", "-c", "write -P 3 2M 6k", image])
            let ours = try img(["map", "--output=json", image])
            let theirs = try qemuImg(["map", "--output=json", image])
            #expect(ours.stdout == theirs.stdout, "map of \(image) differs:\n\(ours.stdout)\n--\n\(theirs.stdout)")
        }
    }

    @Test func infoMapAndCheckAgreeWithQemuImg() throws {
        let directory = try Harness.temporaryDirectory("inspect")
        defer { try? FileManager.default.removeItem(at: directory) }
        let base = directory.appendingPathComponent("base.qcow2").path
        let top = directory.appendingPathComponent("top.qcow2").path
        #expect(try qemuImg(["create", "-f", "qcow2", "-o", "lazy_refcounts=on", base, "64M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 2M", "-c", "write -z 4M 1M", base])
        #expect(try qemuImg(["snapshot", "-c", "snap", base]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 2 1M 2M", base])
        #expect(try qemuImg(["bitmap", "--add", base, "b0"]).status == 0)
        #expect(try qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 3 1536k 64k", top])

        let ourMap = try img(["map", "--output=json", top])
        let theirMap = try qemuImg(["map", "--output=json", top])
        #expect(ourMap.stdout == theirMap.stdout, "map differs:\n\(ourMap.stdout)\n--\n\(theirMap.stdout)")

        // Byte for byte, as scripts that grep qemu-img's output read it.
        for image in [base, top] {
            for command in [["check", "--output=json"], ["check"], ["info"], ["info", "--output=json"],
                            ["info", "--backing-chain"], ["info", "--output=json", "--backing-chain"]] {
                let ours = try img(command + [image])
                let theirs = try qemuImg(command + [image])
                #expect(ours.status == theirs.status)
                #expect(ours.stdout == theirs.stdout, "\(command) \(image):\n\(ours.stdout)\n--\n\(theirs.stdout)")
            }
        }
    }

    /// `info`, `check` and `map`, human and JSON, print qemu-img's bytes
    /// for the cases its output has quirks for: compressed clusters
    /// (counted as fragmented; no place to map them to), a data file (not
    /// in the disk size, not needed by info, named by map), compat 0.10
    /// (still a compression type), bitmaps (an empty flag list),
    /// preallocated space (not in the human map), an empty image (one empty
    /// map entry), and snapshot names that
    /// are long, quoted or past ASCII (escaped, as surrogate pairs past
    /// U+FFFF, and never cut).
    @Test func infoCheckAndMapPrintQemuImgsBytes() throws {
        let directory = try Harness.temporaryDirectory("qemubytes")
        defer { try? FileManager.default.removeItem(at: directory) }
        func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
        func qemuIO(_ image: String, _ commands: [String]) throws {
            _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2"] + commands.flatMap { ["-c", $0] } + [image])
        }
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path("plain.qcow2"), "4M"]).status == 0)
        try qemuIO(path("plain.qcow2"), ["write -P 1 0 1M", "write -P 2 2M 64k"])
        #expect(try qemuImg(["convert", "-c", "-O", "qcow2", path("plain.qcow2"), path("compressed.qcow2")]).status == 0)
        try qemuIO(path("compressed.qcow2"), ["write -P 3 3M 128k"])
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "data_file=\(path("data.raw")),data_file_raw=on",
                             path("data.qcow2"), "1M"]).status == 0)
        try qemuIO(path("data.qcow2"), ["write -P 4 0 512k"])
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", path("v2.qcow2"), "1M"]).status == 0)
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path("empty.qcow2"), "0"]).status == 0)
        let preallocated = path("prealloc.qcow2")
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", preallocated, "1M"]).status == 0)
        try qemuIO(preallocated, ["write -P 5 0 64k"])
        let named = path("named.qcow2")
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", named, "16M"]).status == 0)
        for name in ["s1", "a-much-longer-snapshot-name-than-sixteen", "\u{e9}\"q\\/x\tt", "smile \u{1F600}"] {
            #expect(try qemuImg(["snapshot", "-c", name, named]).status == 0)
        }
        #expect(try qemuImg(["bitmap", "--add", named, "b0"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", "--granularity", "128k", "--disable", named, "b1"]).status == 0)
        for image in ["compressed.qcow2", "data.qcow2", "v2.qcow2", "named.qcow2", "prealloc.qcow2", "empty.qcow2"].map(path) {
            for command in [["info"], ["info", "--output=json"], ["check"], ["check", "--output=json"], ["map"],
                            ["map", "--output=json"]] {
                let ours = try img(command + [image])
                let theirs = try qemuImg(command + [image])
                #expect(ours.status == theirs.status)
                #expect(ours.stdout == theirs.stdout, "\(command) \(image):\n\(ours.stdout)\n--\n\(theirs.stdout)")
            }
        }
        // A lazy-refcounts image left dirty (qemu-io aborts): "cleanly shut down: no".
        let dirty = path("dirty.qcow2")
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "1M"]).status == 0)
        try qemuIO(dirty, ["write -P 6 0 64k", "abort"])
        for command in [["info"], ["info", "--output=json"]] {
            let ours = try img(command + [dirty])
            let theirs = try qemuImg(command + [dirty])
            #expect(theirs.stdout.contains("cleanly shut down: no") || command.count == 2)
            #expect(ours.stdout == theirs.stdout, "\(command):\n\(ours.stdout)\n--\n\(theirs.stdout)")
        }
        // info reads metadata only: a data file gone is no error for it.
        try FileManager.default.removeItem(atPath: path("data.raw"))
        for command in [["info"], ["info", "--output=json"], ["check"]] {
            let ours = try img(command + [path("data.qcow2")])
            let theirs = try qemuImg(command + [path("data.qcow2")])
            #expect(ours.status == theirs.status, "\(command): \(ours.stderr)")
            #expect(ours.stdout == theirs.stdout, "\(command):\n\(ours.stdout)\n--\n\(theirs.stdout)")
        }
    }

    /// `check` prints what qemu-img prints: no allocation line and no zero
    /// cluster counts in JSON for an empty image, and a refcount table past
    /// the end of the file is a corruption (exit 2) checked as empty, not a
    /// failure to check.
    @Test func checkOutputMatchesQemuImgForEmptyImagesAndAMisplacedRefcountTable() throws {
        let directory = try Harness.temporaryDirectory("checkout")
        defer { try? FileManager.default.removeItem(at: directory) }
        let empty = directory.appendingPathComponent("empty.qcow2").path
        let written = directory.appendingPathComponent("written.qcow2").path
        let misplaced = directory.appendingPathComponent("misplaced.qcow2").path
        for image in [empty, written, misplaced] {
            #expect(try qemuImg(["create", "-q", "-f", "qcow2", image, "64M"]).status == 0)
        }
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 7 0 1M", written])
        let handle = try #require(FileHandle(forUpdatingAtPath: misplaced))
        try handle.seek(toOffset: 48)  // refcount_table_offset
        handle.write(Data([0, 0, 1, 0, 0, 0, 0, 0]))  // 1 TiB, far past the end
        try handle.close()
        for (image, status) in [(empty, Int32(0)), (written, 0), (misplaced, 2)] {
            let ours = try img(["check", image])
            let theirs = try qemuImg(["check", image])
            #expect(theirs.status == status)
            #expect(ours.status == theirs.status, "\(image): \(ours.stderr)")
            #expect(ours.stdout == theirs.stdout, "\(image):\n\(ours.stdout)\n--\n\(theirs.stdout)")
            let oursJSON = try img(["check", "--output=json", image])
            let theirsJSON = try qemuImg(["check", "--output=json", image])
            let a = try JSONSerialization.jsonObject(with: Data(oursJSON.stdout.utf8)) as? [String: Any] ?? [:]
            let b = try JSONSerialization.jsonObject(with: Data(theirsJSON.stdout.utf8)) as? [String: Any] ?? [:]
            #expect(Set(a.keys) == Set(b.keys), "\(image): \(a.keys.sorted()) vs \(b.keys.sorted())")
            for key in b.keys { #expect("\(a[key] ?? "-")" == "\(b[key] ?? "-")", "\(image): \(key)") }
        }
        // A leak repaired with JSON output: JSON only, with leaks-fixed.
        let handle2 = try #require(FileHandle(forUpdatingAtPath: written))
        let end = try handle2.seekToEnd()
        try handle2.truncate(atOffset: end + 65536)
        try handle2.seek(toOffset: 0x20000 + 2 * (end / 65536))  // the first refcount block
        handle2.write(Data([0, 1]))
        try handle2.close()
        let copy = directory.appendingPathComponent("copy.qcow2").path
        try FileManager.default.copyItem(atPath: written, toPath: copy)
        let ours = try img(["check", "-r", "leaks", "--output=json", written])
        let theirs = try qemuImg(["check", "-r", "leaks", "--output=json", copy])
        #expect(ours.status == theirs.status)
        let a = try JSONSerialization.jsonObject(with: Data(ours.stdout.utf8)) as? [String: Any] ?? [:]
        let b = try JSONSerialization.jsonObject(with: Data(theirs.stdout.utf8)) as? [String: Any] ?? [:]
        #expect("\(b["leaks-fixed"] ?? "-")" == "1")
        #expect(Set(a.keys.filter { $0 != "filename" }) == Set(b.keys.filter { $0 != "filename" }), "\(ours.stdout)")
        for key in b.keys where key != "filename" { #expect("\(a[key] ?? "-")" == "\(b[key] ?? "-")", "repair: \(key)") }
    }

    @Test func checkFindsLeaksAndCorruption() throws {
        let directory = try Harness.temporaryDirectory("damage")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("d.qcow2").path
        #expect(try qemuImg(["create", "-f", "qcow2", path, "16M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 5 0 128k", path])
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        // Refcount block at 0x20000 (16-bit entries): raise cluster 1's count (a leak).
        try handle.seek(toOffset: 0x20000 + 2)
        handle.write(Data([0, 2]))
        try handle.close()
        let leaked = try img(["check", path])
        #expect(leaked.status == 3, "\(leaked.stdout)\(leaked.stderr)")
        #expect(try qemuImg(["check", path]).status == 3)
        let repaired = try img(["check", "-r", "leaks", path])
        #expect(repaired.status == 0, "\(repaired.stdout)\(repaired.stderr)")
        #expect(repaired.stdout.contains("1 leaked clusters"))
        #expect(try qemuImg(["check", path]).status == 0, "qemu-img agrees the leak is gone")
        let handle2 = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        // Zero cluster 0's refcount (the header): a corruption.
        try handle2.seek(toOffset: 0x20000)
        handle2.write(Data([0, 0]))
        try handle2.close()
        let corrupt = try img(["check", path])
        #expect(corrupt.status == 2, "\(corrupt.stdout)\(corrupt.stderr)")
        #expect(try qemuImg(["check", path]).status == 2)
        // A cluster in use counted 0 needs a rebuild: -r leaks gives up
        // (exit 1) and -r all rebuilds, both as qemu-img does.
        let copy = directory.appendingPathComponent("copy.qcow2").path
        try FileManager.default.copyItem(atPath: path, toPath: copy)
        let leaksOnly = try img(["check", "-r", "leaks", path])
        #expect(leaksOnly.status == 1 && leaksOnly.stderr.contains("ERROR need to rebuild refcount structures"),
                "\(leaksOnly.stdout)\(leaksOnly.stderr)")
        #expect(try qemuImg(["check", "-r", "leaks", copy]).status == 1)
        let fixed = try img(["check", "-r", "all", path])
        #expect(fixed.status == 0, "\(fixed.stdout)\(fixed.stderr)")
        #expect(fixed.stdout == (try qemuImg(["check", "-r", "all", copy])).stdout)
        #expect(try qemuImg(["check", path]).status == 0)
    }

    /// Flips the COPIED flag (bit 63) of the entry at `offset`.
    func flipCopied(_ path: String, at offset: UInt64) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        let first = try #require(handle.readData(ofLength: 1).first)
        try handle.seek(toOffset: offset)
        handle.write(Data([first ^ 0x80]))
    }

    /// Exit status 1 (the check could not run) where qemu-img gives it.
    @Test func checkThatCannotRunExitsOneLikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("check1")
        defer { try? FileManager.default.removeItem(at: directory) }
        let truncated = directory.appendingPathComponent("truncated.qcow2").path
        #expect(FileManager.default.createFile(atPath: truncated, contents: Data([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])))
        for image in [directory.appendingPathComponent("missing.qcow2").path, truncated] {
            let ours = try img(["check", "-f", "qcow2", image])
            let theirs = try qemuImg(["check", "-f", "qcow2", image])
            #expect(theirs.status == 1)
            #expect(ours.status == theirs.status, "\(image): \(ours.stderr)")
            #expect(ours.stderr.contains("Could not open"), "\(ours.stderr)")
        }
    }

    /// With extended L2, preallocation leaves every subcluster unallocated,
    /// as qemu-img does, so an overlay still reads its backing file. Strata
    /// marked them all allocated: the overlay read as zeroes. (Without
    /// extended L2 the combination is refused: `ImgCreateTests`.)
    @Test func aPreallocatedExtendedL2OverlayReadsItsBackingFile() throws {
        let directory = try Harness.temporaryDirectory("prealloc-overlay")
        defer { try? FileManager.default.removeItem(at: directory) }
        let base = directory.appendingPathComponent("base.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", base, "4M"]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 1M", base]).status == 0)
        var maps: [String] = []
        for (tool, name) in [(img, "mine.qcow2"), (qemuImg, "theirs.qcow2")] {
            let overlay = directory.appendingPathComponent(name).path
            let created = try tool(["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                                    "-o", "preallocation=metadata,extended_l2=on", overlay, "4M"])
            #expect(created.status == 0, "\(created.stderr)")
            let compared = try qemuImg(["compare", overlay, base])
            #expect(compared.status == 0, "\(name): \(compared.stdout)")
            let map = try qemuImg(["map", "--output=json", overlay]).stdout
            maps.append(map.replacingOccurrences(of: #", "offset": [0-9]+"#, with: "", options: .regularExpression))
        }
        #expect(maps[0] == maps[1])
    }

    /// A repair writes, and sharing writes with other users is for readers
    /// only: `check -r … -U` is refused as qemu-img refuses it, plain
    /// `check -U` is not.
    @Test func repairWithForceShareIsRefusedLikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("check-U")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("image.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "1M"]).status == 0)
        for repair in ["leaks", "all"] {
            let ours = try img(["check", "-r", repair, "-U", path])
            let theirs = try qemuImg(["check", "-r", repair, "-U", path])
            #expect(theirs.status == 1)
            #expect(ours.status == theirs.status, "-r \(repair): \(ours.stdout)\(ours.stderr)")
            #expect(ours.stderr.contains("force-share=on can only be used with read-only images"), "\(ours.stderr)")
        }
        #expect(try img(["check", "-U", path]).status == 0)
    }

    /// A raw file whose size is not a multiple of 512 is, to qemu-img, that
    /// size rounded up to whole sectors.
    @Test func rawFileSizeIsRoundedToSectorsLikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("info-unaligned")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("odd.raw").path
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 0x5a, count: 1000)))
        let ours = try img(["info", "--output=json", path])
        #expect(ours.status == 0, "\(ours.stderr)")
        let mine = try JSONSerialization.jsonObject(with: Data(ours.stdout.utf8)) as? [String: Any] ?? [:]
        let theirs = try qemuInfo(path)
        #expect(theirs["virtual-size"] as? Int64 == 1024)
        #expect(mine["virtual-size"] as? Int64 == theirs["virtual-size"] as? Int64)
        #expect(try img(["map", "--output=json", path]).stdout == (try qemuImg(["map", "--output=json", path])).stdout)
    }

    /// Human sizes as qemu-img prints them: the next unit from 1000 of the
    /// current one on ("0.977 GiB", not "1000 MiB"), three significant
    /// digits, and its "1e+03 KiB" where rounding reaches 1000.
    @Test func humanSizesMoveToTheNextUnitAt1000LikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("human-sizes")
        defer { try? FileManager.default.removeItem(at: directory) }
        let sizes: [Int64] = [512, 1_023_488, 1_024_000, 1_048_064, 1000 << 20, 1023 << 20, 1 << 30, 1000 << 30, 3 << 40 + 512]
        for size in sizes {
            let path = directory.appendingPathComponent("\(size).raw").path
            #expect(FileManager.default.createFile(atPath: path, contents: nil))
            #expect(truncate(path, off_t(size)) == 0)
            let ours = try img(["info", path])
            let theirs = try qemuImg(["info", path])
            #expect(ours.status == 0, "\(ours.stderr)")
            #expect(ours.stdout == theirs.stdout, "\(size):\n\(ours.stdout)\n--\n\(theirs.stdout)")
        }
    }

    /// qemu-img info opens an image without its backing file, so an image
    /// whose backing file is missing is still described; only
    /// --backing-chain needs the chain (and fails in both).
    @Test func infoDescribesAnImageWhoseBackingFileIsMissing() throws {
        let directory = try Harness.temporaryDirectory("info-nobacking")
        defer { try? FileManager.default.removeItem(at: directory) }
        let overlay = directory.appendingPathComponent("overlay.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", overlay, "1M"]).status == 0)
        let ours = try img(["info", "--output=json", overlay])
        #expect(ours.status == 0, "\(ours.stderr)")
        let mine = try JSONSerialization.jsonObject(with: Data(ours.stdout.utf8)) as? [String: Any] ?? [:]
        let theirs = try qemuInfo(overlay)
        for key in ["backing-filename", "full-backing-filename", "backing-filename-format"] {
            #expect(mine[key] as? String == theirs[key] as? String, "\(key)")
        }
        #expect(mine["virtual-size"] as? Int64 == 1 << 20)
        #expect(try img(["info", "--backing-chain", overlay]).status == 1)
        #expect(try qemuImg(["info", "--backing-chain", overlay]).status == 1)
    }

    /// An image named by one character, relative to the current directory,
    /// with a backing file beside it: `create`, `info` and `check` work and
    /// report what qemu-img reports. (Foundation's
    /// `deletingLastPathComponent`, which found the backing file's
    /// directory before, trapped on such a name.)
    @Test func aOneCharacterImageNameFindsItsBackingFile() throws {
        let directory = try Harness.temporaryDirectory("short-name").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        func run(_ tool: String, _ arguments: [String]) throws -> Harness.Output {
            try Harness.run(tool, arguments, currentDirectory: directory)
        }
        #expect(try run("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", "b", "1M"]).status == 0)
        let created = try run(Harness.strata, ["img", "create", "-q", "-f", "qcow2", "-b", "b", "-F", "qcow2", "a", "1M"])
        #expect(created.status == 0, "\(created.stderr)")
        #expect(try run("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", "-b", "b", "-F", "qcow2", "q", "1M"]).status == 0)
        for command in [["info", "--output=json"], ["info", "--backing-chain"], ["check"]] {
            let ours = try run(Harness.strata, ["img"] + command + ["a"])
            let theirs = try run("/usr/bin/qemu-img", command + ["q"])
            #expect(ours.status == 0, "\(command): \(ours.stderr)")
            #expect(ours.stdout.replacingOccurrences(of: "\"a\"", with: "\"q\"")
                        .replacingOccurrences(of: "image: a\n", with: "image: q\n") == theirs.stdout,
                    "\(command):\n\(ours.stdout)\n--\n\(theirs.stdout)")
        }
    }

    /// A FIFO named as an image or a backing file is refused at once, with
    /// the message qemu-img gives a directory; qemu-img itself would wait in
    /// `open` for a writer that never comes.
    @Test func aFifoAsImageOrBackingFileIsRefusedWithoutWaiting() throws {
        let directory = try Harness.temporaryDirectory("fifo")
        defer { try? FileManager.default.removeItem(at: directory) }
        let fifo = directory.appendingPathComponent("pipe").path
        #expect(mkfifo(fifo, 0o600) == 0)
        let overlay = directory.appendingPathComponent("overlay.qcow2").path
        let made = try qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", fifo, "-F", "raw", overlay, "1M"])
        #expect(made.status == 0, "\(made.stderr)")
        let runs: [[String]] = [["img", "info", fifo], ["img", "info", "--backing-chain", overlay], ["img", "check", overlay],
                                ["serve", "-k", directory.appendingPathComponent("s").path, "-f", "raw", fifo]]
        for arguments in runs {
            let ours = try Harness.run(Harness.strata, arguments, timeout: 20)
            #expect(ours.status == 1, "\(arguments): \(ours.status) \(ours.stderr)")
            #expect(ours.stderr.contains("'file' driver requires '\(fifo)' to be a regular file"), "\(ours.stderr)")
        }
        // qemu-img info does not open the backing file, so it is not refused.
        let described = try Harness.run(Harness.strata, ["img", "info", overlay], timeout: 20)
        #expect(described.status == 0, "\(described.stderr)")
    }

    @Test func checkFindsAndRepairsCopiedFlagsLikeQemuImg() throws {
        let directory = try Harness.temporaryDirectory("copied")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("c.qcow2").path
        #expect(try qemuImg(["create", "-f", "qcow2", path, "16M"]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 5 0 128k", path]).status == 0)
        let l1Offset = try u64(path, at: 40)
        let l2Offset = try u64(path, at: l1Offset) & 0x00ff_ffff_ffff_fe00
        try #require(l2Offset != 0)
        // Cleared on a data cluster (refcount 1) and on the L2 table itself.
        try flipCopied(path, at: l2Offset + 8)
        try flipCopied(path, at: l1Offset)
        let found = try img(["check", path])
        #expect(found.status == 2, "\(found.stdout)\(found.stderr)")
        // The errors go to stderr, as qemu-img prints them.
        #expect(found.stderr.contains("ERROR OFLAG_COPIED data cluster: l2_entry="), "\(found.stderr)")
        #expect(found.stderr.contains("ERROR OFLAG_COPIED L2 cluster: l1_index=0"), "\(found.stderr)")
        #expect(found.stdout.contains("2 errors were found on the image"), "\(found.stdout)")
        let qemu = try qemuImg(["check", path])
        #expect(qemu.status == 2 && qemu.stdout.contains("2 errors were found"), "\(qemu.stdout)")
        // Both repairs fix them: -r leaks too, as nothing else is wrong.
        let copy = directory.appendingPathComponent("copy.qcow2").path
        try FileManager.default.copyItem(atPath: path, toPath: copy)
        for (mode, image) in [("leaks", path), ("all", copy)] {
            let theirs = directory.appendingPathComponent("theirs.qcow2").path
            try? FileManager.default.removeItem(atPath: theirs)
            try FileManager.default.copyItem(atPath: image, toPath: theirs)
            let fixed = try img(["check", "-r", mode, image])
            let qemuFixed = try qemuImg(["check", "-r", mode, theirs])
            #expect(fixed.status == 0 && qemuFixed.status == 0, "\(fixed.stdout)\(fixed.stderr)")
            #expect(fixed.stdout.contains("2 corruptions"), "\(fixed.stdout)")
            #expect(fixed.stdout == qemuFixed.stdout && fixed.stderr == qemuFixed.stderr,
                    "\(mode):\n\(fixed.stdout)\(fixed.stderr)--\n\(qemuFixed.stdout)\(qemuFixed.stderr)")
            #expect(try qemuImg(["check", image]).status == 0, "qemu-img agrees the flags are right again")
            let read = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "read -P 5 0 128k", image])
            #expect(read.status == 0 && !read.stdout.contains("fail"), "\(read.stdout)")
        }
    }
}

enum ImageSizeForTests {
    static func bytes(_ text: String) -> UInt64 {
        let units: [Character: UInt64] = ["k": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        guard let unit = units[text.last!] else { return UInt64(text)! }
        return UInt64(text.dropLast())! * unit
    }
}
