import Foundation
import Testing

/// Damaged header fields, each opened by `info` and `check` of both tools:
/// the same status and output, and of several problems the same one named
/// (QEMU's order of checks), in QEMU's words.
@Suite struct ImgHeaderFieldTests: ImageToolRunner {
    /// A field to overwrite: its offset in the header, width and value.
    struct Field: CustomStringConvertible, Sendable {
        var offset: UInt64
        var width: Int
        var value: UInt64
        var description: String { "\(value) at \(offset)" }
    }

    struct Damage: CustomTestStringConvertible, Sendable {
        var name: String
        var clusterSize = 65536
        var compression = "zlib"
        var fields: [Field]
        var testDescription: String { name }
    }

    static let incompatible: UInt64 = 72, autoclear: UInt64 = 88, compressionType: UInt64 = 104
    static let damages: [Damage] = [
        Damage(name: "compression bit with zlib", fields: [Field(offset: incompatible, width: 8, value: 1 << 3)]),
        Damage(name: "zstd without the bit", compression: "zstd", fields: [Field(offset: incompatible, width: 8, value: 0)]),
        Damage(name: "unknown compression type", fields: [Field(offset: compressionType, width: 1, value: 2)]),
        Damage(name: "unknown incompatible bit", fields: [Field(offset: incompatible, width: 8, value: 1 << 5)]),
        Damage(name: "compression before unknown bits and refcount width",
               fields: [Field(offset: incompatible, width: 8, value: 1 << 5 | 1 << 3), Field(offset: 96, width: 4, value: 7)]),
        Damage(name: "backing offset before compression",
               fields: [Field(offset: 8, width: 8, value: 1 << 20), Field(offset: compressionType, width: 1, value: 2)]),
        Damage(name: "backing name too long for the cluster",
               fields: [Field(offset: 8, width: 8, value: 65536), Field(offset: 16, width: 4, value: 5)]),
        Damage(name: "backing name of zeroes", fields: [Field(offset: 8, width: 8, value: 0x400), Field(offset: 16, width: 4, value: 8)]),
        Damage(name: "header too short", fields: [Field(offset: 100, width: 4, value: 0)]),
        Damage(name: "header past the cluster", clusterSize: 512, fields: [Field(offset: 100, width: 4, value: 1024)]),
        Damage(name: "subclusters under 512 bytes", clusterSize: 512, fields: [Field(offset: incompatible, width: 8, value: 1 << 4)]),
        Damage(name: "image too big for an int L1 index", clusterSize: 512, fields: [Field(offset: 24, width: 8, value: 1 << 47)]),
        Damage(name: "L1 table too small", clusterSize: 512, fields: [Field(offset: 24, width: 8, value: 1 << 40)]),
        Damage(name: "refcount table offset before L1 size",
               fields: [Field(offset: 36, width: 4, value: 0xffff_fe00), Field(offset: 48, width: 8, value: 0x10200)]),
        Damage(name: "L1 offset off the grid before the disk's size",
               fields: [Field(offset: 40, width: 8, value: 0x30001), Field(offset: 36, width: 4, value: 0)]),
        Damage(name: "subcluster size before refcount width", clusterSize: 512,
               fields: [Field(offset: incompatible, width: 8, value: 1 << 4), Field(offset: 96, width: 4, value: 7)]),
        Damage(name: "encryption method after the L1 table",
               fields: [Field(offset: 32, width: 4, value: 3), Field(offset: 36, width: 4, value: 0)]),
        Damage(name: "data file bit without a name", fields: [Field(offset: incompatible, width: 8, value: 1 << 2)]),
        Damage(name: "raw data file without a data file", fields: [Field(offset: autoclear, width: 8, value: 1 << 1)]),
    ]

    @Test(arguments: damages)
    func aDamagedHeaderIsReadAsQemuImgReadsIt(damage: Damage) throws {
        let directory = try Harness.temporaryDirectory("headerfield")
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("h.qcow2").path
        let options = "cluster_size=\(damage.clusterSize),compression_type=\(damage.compression)"
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", options, path, "4M"]).status == 0)
        for field in damage.fields { try write(path, field.value, width: field.width, at: field.offset) }
        for command in ["info", "check"] {
            let ours = try img([command, path]), theirs = try qemuImg([command, path])
            #expect(ours.status == theirs.status, "\(command): \(ours.stderr)--\n\(theirs.stderr)")
            #expect(ours.stdout == theirs.stdout, "\(command):\n\(ours.stdout)--\n\(theirs.stdout)")
            #expect(ours.stderrAsQemuImg() == theirs.stderr, "\(command):\n\(ours.stderr)--\n\(theirs.stderr)")
        }
    }
}
