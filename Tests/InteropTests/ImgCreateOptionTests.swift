import Foundation
import Testing

/// `strata img create -o` reads option lists as qemu-img does: the same
/// "Formatting" line (given options and defaults, in QEMU's order), the
/// same first complaint for a bad list (unknown names, values that are not
/// of the option's type, values the format refuses), the same exit status.
@Suite struct ImgCreateOptionTests: ImageToolRunner {
    static let cases: [[String]] = [
        // Given options and defaults in the "Formatting" line.
        ["-f", "qcow2", "-o", "compat=1.1", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=v2,preallocation=metadata", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "extended_l2=yes,data_file=TARGET.data,data_file_raw=off", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=0x10,cluster_size=0x1000", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits= 8,nolazy_refcounts", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "size=0x100000", "TARGET"],
        ["-f", "qcow2", "-o", "size=2M,size=3M", "TARGET"],
        ["-f", "raw", "-o", "preallocation=off", "TARGET", "1M"],
        ["-f", "raw", "-o", "size=2M", "TARGET"],
        // Refused while the list is read, in order: the first bad option.
        ["-f", "qcow2", "-o", "cluster_size=x,bogus=1", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "bogus=1,cluster_size=x", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=64k,cluster_size=-1", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=16k", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=99999999999999999999", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "lazy_refcounts=ON", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "size=1e3", "TARGET"],
        ["-f", "qcow2", "-o", "size=", "TARGET"],
        ["-f", "qcow2", "-o", "size=18446744073709551616", "TARGET"],
        ["-f", "qcow2", "-o", "size=1e3", "TARGET", "1M"],
        ["-f", "raw", "-o", "cluster_size=64k", "TARGET", "1M"],
        ["-f", "qcow2", "TARGET"],
        ["-f", "raw", "-b", "TARGET.base", "-F", "raw", "TARGET", "1M"],
        ["-f", "foo", "TARGET", "1M"],
        ["-f", "qcow2", "-b", "TARGET.missing", "-F", "raw", "TARGET", "1M"],
        ["-f", "qcow2", "-u", "-b", "TARGET.missing", "TARGET", "1M"],
        // Refused by the format, after the "Formatting" line.
        ["-f", "qcow2", "-o", "compat=2,preallocation=foo,compression_type=lz4", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "preallocation=foo,compression_type=lz4", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compression_type=lz4", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=1.5k,refcount_bits=3", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "cluster_size=4M", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=-1", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10,lazy_refcounts=on,refcount_bits=8", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10,refcount_bits=8", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10,extended_l2=on", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10,compression_type=zstd", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10,data_file=TARGET.data", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "data_file_raw=on", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "TARGET", "1M"],
        ["-f", "raw", "-o", "preallocation=metadata", "TARGET", "1M"],
        ["-f", "raw", "-o", "preallocation=xx", "TARGET", "1M"],
        ["-f", "qcow2", "-F", "raw", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "compat=0.10,extended_l2=on,lazy_refcounts=on", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "extended_l2=on,cluster_size=4k,refcount_bits=3", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "refcount_bits=9223372036854775808", "TARGET", "1M"],
        // Checked while the command line is read: no file name.
        ["-f", "qcow2", "-o", "bogus=1,", "TARGET", "1M"],
        ["-f", "qcow2", "-o", "size=1M,", "TARGET", "1.5"],
        ["-f", "qcow2", "-o", "data_file=TARGET,,x,,,,", "TARGET", "1M"],
    ]

    @Test(arguments: cases)
    func optionListsReadAsQemuImgReadsThem(arguments: [String]) throws {
        let directory = try Harness.temporaryDirectory("create-options")
        defer { try? FileManager.default.removeItem(at: directory) }
        let target = directory.appendingPathComponent("target.img").path
        let resolved = arguments.map { $0.replacingOccurrences(of: "TARGET", with: target) }
        let clear = {
            for suffix in ["", ".data"] { try? FileManager.default.removeItem(atPath: target + suffix) }
        }
        let qemu = try qemuImg(["create"] + resolved)
        clear()
        let mine = try img(["create"] + resolved)
        clear()
        let shown = arguments.joined(separator: " ")
        #expect(mine.status == qemu.status, "\(shown): status \(mine.status), qemu-img \(qemu.status)")
        #expect(mine.stdout == qemu.stdout, "\(shown)")
        #expect(mine.stderrAsQemuImg() == qemu.stderr, "\(shown)")
    }
}
