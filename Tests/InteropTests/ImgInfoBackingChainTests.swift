import Foundation
import Testing

/// `info --backing-chain` opens each image of the chain on its own, as
/// qemu-img does, so a backing file that is missing, is not what its
/// format says, or leads back up the chain is reported by its own name,
/// with qemu-img's words and status.
@Suite struct ImgInfoBackingChainTests: ImageToolRunner {
    @Test func brokenChainsAreReportedAsQemuImgReportsThem() throws {
        let directory = try Harness.temporaryDirectory("infochain")
        defer { try? FileManager.default.removeItem(at: directory) }
        func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
        func create(_ name: String, backing: String? = nil, unsafe: Bool = false) throws {
            var arguments = ["create", "-q", "-f", "qcow2"]
            if let backing { arguments += ["-b", backing, "-F", "qcow2"] + (unsafe ? ["-u"] : []) }
            #expect(try qemuImg(arguments + [path(name)] + (unsafe || backing == nil ? ["16M"] : [])).status == 0)
        }
        // base <- middle <- top, then middle removed: two layers down.
        try create("base.qcow2")
        try create("middle.qcow2", backing: "base.qcow2")
        try create("top.qcow2", backing: "middle.qcow2")
        try FileManager.default.removeItem(atPath: path("middle.qcow2"))
        // a <- b <- a: a loop.
        try create("a.qcow2")
        try create("b.qcow2", backing: "a.qcow2")
        #expect(try qemuImg(["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", path("a.qcow2")]).status == 0)
        // A backing file that is not a qcow2 image at all.
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: path("junk.qcow2")))
        try create("overjunk.qcow2", backing: "junk.qcow2", unsafe: true)

        for image in ["top.qcow2", "b.qcow2", "overjunk.qcow2"] {
            for output in ["human", "json"] {
                let arguments = ["info", "--backing-chain", "--output=\(output)", path(image)]
                let ours = try img(arguments), theirs = try qemuImg(arguments)
                #expect(theirs.status == 1, "\(image): \(theirs.stderr)")
                #expect(ours.status == theirs.status && ours.stdout == theirs.stdout, "\(image) \(output)")
                #expect(ours.stderrAsQemuImg() == theirs.stderr,
                        "\(image) \(output):\n\(ours.stderr)--\n\(theirs.stderr)")
            }
        }
    }
}
