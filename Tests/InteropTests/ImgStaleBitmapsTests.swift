import Foundation
import Testing

/// An image whose bitmaps a program without bitmap support has written
/// over (the bitmaps extension kept, its autoclear bit cleared): every
/// tool warns as qemu-img and qemu-nbd do, and a read-write open drops the
/// extension as they do.
@Suite struct ImgStaleBitmapsTests: ImageToolRunner {
    /// Offset of the autoclear feature bits in a version 3 header.
    let autoclearOffset: UInt64 = 88

    /// A version 3 image with two bitmaps whose autoclear bit is cleared.
    func makeStaleImage(in directory: URL) throws -> String {
        let path = directory.appendingPathComponent("stale.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", path, "16M"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", path, "b0"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", "--disable", path, "b1"]).status == 0)
        try write(path, try u64(path, at: autoclearOffset) & ~1, width: 8, at: autoclearOffset)
        return path
    }

    /// qemu-img's stderr as Strata prints it: its own name, and a newline
    /// after the hint (qemu-img runs the next line on after "to fix.").
    func asStrata(_ qemuStderr: String) -> String {
        qemuStderr.replacingOccurrences(of: "qemu-img", with: "strata img")
            .replacingOccurrences(of: "on the image file to fix.", with: "on the image file to fix.\n")
    }

    @Test(arguments: [["info"], ["map", "--output=json"], ["check"]])
    func everyCommandWarnsLikeQemuImg(command: [String]) throws {
        let directory = try Harness.temporaryDirectory("stalebitmaps")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = try makeStaleImage(in: directory)
        let ours = try img(command + [path]), theirs = try qemuImg(command + [path])
        #expect(theirs.stderr.hasPrefix("qemu-img: warning: a program lacking bitmap support modified this file"),
                "\(theirs.stderr)")
        #expect(ours.status == theirs.status, "\(ours.stderr)")
        #expect(ours.stdout == theirs.stdout, "\n\(ours.stdout)--\n\(theirs.stdout)")
        #expect(ours.stderr == asStrata(theirs.stderr), "\n\(ours.stderr)--\n\(theirs.stderr)")
    }

    /// A version 2 header has no autoclear bits: its bitmaps extension is
    /// always stale, and QEMU words the warning for that.
    @Test func aVersion2ImageWithBitmapsGetsQemusOwnWarning() throws {
        let directory = try Harness.temporaryDirectory("stalebitmaps2")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("v2.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "16M"]).status == 0)
        // The extensions of a version 2 header start at byte 72: a bitmaps
        // extension (24 bytes: one bitmap, a directory nowhere), then the end.
        var ext: [UInt8] = [0x23, 0x85, 0x28, 0x75, 0, 0, 0, 24, 0, 0, 0, 1]
        ext += [UInt8](repeating: 0, count: 20 + 8)
        try write(path, bytes: ext, at: 72)
        let ours = try img(["info", path]), theirs = try qemuImg(["info", path])
        #expect(theirs.stderr.hasPrefix("qemu-img: warning: This qcow2 v2 image contains bitmaps"), "\(theirs.stderr)")
        #expect(ours.status == 0 && ours.stdout == theirs.stdout, "\(ours.stderr)")
        #expect(ours.stderr == asStrata(theirs.stderr), "\n\(ours.stderr)--\n\(theirs.stderr)")
    }

    /// `serve` warns as qemu-nbd does; read-only it leaves the file alone,
    /// read-write it drops the stale extension, after which no tool warns.
    @Test func serveWarnsAndAReadWriteOpenDropsTheExtension() throws {
        let directory = try Harness.temporaryDirectory("stalebitmapsserve")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = try makeStaleImage(in: directory)
        let before = try Data(contentsOf: URL(fileURLWithPath: path))

        let readOnly = try ServedImage(image: path, options: ["-f", "qcow2", "-r"], directory: directory)
        _ = try Harness.waitForSize(readOnly.uri)
        readOnly.stop()
        let readOnlyErrors = readOnly.errors()
        let warning = "strata: warning: a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent\nSome clusters may be leaked, run 'strata img check -r' on the image file to fix.\n"
        #expect(readOnlyErrors.hasPrefix(warning), "\(readOnlyErrors)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)) == before)

        let readWrite = try ServedImage(image: path, options: ["-f", "qcow2"], directory: directory)
        _ = try Harness.waitForSize(readWrite.uri)
        readWrite.stop()
        let readWriteErrors = readWrite.errors()
        #expect(readWriteErrors.hasPrefix(warning), "\(readWriteErrors)")
        let after = try qemuImg(["info", path])
        #expect(after.status == 0 && after.stderr.isEmpty, "\(after.stderr)")
        // The bitmaps' clusters are leaked now, as QEMU leaves them.
        let check = try qemuImg(["check", path])
        #expect(check.status == 3 && check.stdout.contains("leaked clusters were found"), "\(check.stdout)")
        #expect(try img(["info", path]).stderr.isEmpty)
    }
}
