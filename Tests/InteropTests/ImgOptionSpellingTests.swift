import Foundation
import Testing

/// Options of qemu-img 7.2's info, map and check that scripts use:
/// `map --start-offset/--max-length`, `check -q`, the long `--format` and
/// `--repair`. Same output, same errors, same exit status.
@Suite struct ImgOptionSpellingTests: ImageToolRunner {
    static let commands: [[String]] = [
        ["map", "--start-offset=1M", "IMAGE"],
        ["map", "--start-offset", "100", "--max-length", "1000", "IMAGE"],
        ["map", "--max-length=2M", "--output=json", "IMAGE"],
        ["map", "--start-offset=1M", "--max-length=9223372036854775807", "--output=json", "IMAGE"],
        ["map", "--start-offset=64M", "--output=json", "IMAGE"],
        ["map", "--start-offset=abc", "IMAGE"],
        ["map", "--max-length=8E", "IMAGE"],
        ["info", "--format=qcow2", "IMAGE"],
        ["map", "--format", "qcow2", "--output=json", "IMAGE"],
        ["check", "-q", "IMAGE"],
        ["check", "-q", "--output=json", "IMAGE"],
        ["check", "-q", "LEAKY"],
        ["check", "--format=qcow2", "LEAKY"],
    ]

    @Test(arguments: commands)
    func sameAsQemuImg(command: [String]) throws {
        let directory = try Harness.temporaryDirectory("img-spellings")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("m.qcow2").path
        let leaky = directory.appendingPathComponent("leaky.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", image, "4M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -z 1M 64k",
                                                "-c", "write -P 2 3M 64k", image])
        try FileManager.default.copyItem(atPath: image, toPath: leaky)
        try Self.dropFirstDataCluster(leaky)
        let arguments = command.map { $0 == "IMAGE" ? image : $0 == "LEAKY" ? leaky : $0 }
        let ours = try img(arguments)
        let theirs = try qemuImg(arguments)
        let shown = command.joined(separator: " ")
        #expect(ours.status == theirs.status, "\(shown): \(ours.stderr)")
        #expect(ours.stdout == theirs.stdout, "\(shown)")
        #expect(ours.stderrAsQemuImg() == theirs.stderr, "\(shown)")
    }

    /// `check --repair=leaks` repairs as `-r leaks` does.
    @Test func repairSpelledLong() throws {
        let directory = try Harness.temporaryDirectory("img-repair-long")
        defer { try? FileManager.default.removeItem(at: directory) }
        let leaky = directory.appendingPathComponent("leaky.qcow2").path
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", leaky, "4M"]).status == 0)
        _ = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M", leaky])
        try Self.dropFirstDataCluster(leaky)
        let repaired = try img(["check", "--repair=leaks", leaky])
        #expect(repaired.status == 0, "\(repaired.stdout)\(repaired.stderr)")
        #expect(try qemuImg(["check", leaky]).status == 0)
    }

    /// Clears the first L2 entry: its cluster leaks.
    static func dropFirstDataCluster(_ path: String) throws {
        let file = try #require(FileHandle(forUpdatingAtPath: path))
        defer { try? file.close() }
        func u64(at offset: UInt64) throws -> UInt64 {
            try file.seek(toOffset: offset)
            return (file.readData(ofLength: 8)).reduce(0) { $0 << 8 | UInt64($1) }
        }
        let l2 = try u64(at: u64(at: 40)) & 0x00ff_ffff_ffff_fe00
        try file.seek(toOffset: l2)
        file.write(Data(count: 8))
    }
}
