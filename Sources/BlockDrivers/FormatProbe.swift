/// Guesses an image's format from its first bytes, as `qemu-img` does
/// when no format is given. Only magic numbers: a file that matches none
/// is raw.
public enum FormatProbe {
    /// Bytes read for probing, and the part of a probed raw image that
    /// writes may not turn into another format.
    public static let probeSize = 512

    private static let magics: [(format: String, offset: Int, bytes: [UInt8])] = [
        ("qcow2", 0, Array("QFI".utf8) + [0xfb]),
        ("qed", 0, Array("QED".utf8) + [0x00]),
        ("vmdk", 0, Array("KDMV".utf8)),
        ("vmdk", 0, Array("# Disk DescriptorFile".utf8)),
        ("vpc", 0, Array("conectix".utf8)),
        ("vhdx", 0, Array("vhdxfile".utf8)),
        ("luks", 0, Array("LUKS".utf8) + [0xba, 0xbe]),
        ("parallels", 0, Array("WithoutFreeSpace".utf8)),
        ("parallels", 0, Array("WithouFreSpacExt".utf8)),
        ("bochs", 0, Array("Bochs Virtual HD Image".utf8)),
        ("cloop", 0, Array("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n".utf8)),
        ("vdi", 0x40, [0x7f, 0x10, 0xda, 0xbe]),
    ]

    /// The format the bytes look like, or "raw".
    public static func detect(_ head: UnsafeRawBufferPointer) -> String? {
        for entry in magics where head.count >= entry.offset + entry.bytes.count {
            var matches = true
            for (index, byte) in entry.bytes.enumerated() where head[entry.offset + index] != byte {
                matches = false
                break
            }
            if matches {
                if entry.format == "qcow2", head.count >= 8 {
                    // Version 1 is the old qcow format; QEMU's probes claim
                    // neither 0 (the file is raw unless another magic matches).
                    let version = head[4...7].reduce(0) { $0 << 8 | UInt32($1) }
                    if version == 0 { continue }
                    return version == 1 ? "qcow" : "qcow2"
                }
                return entry.format
            }
        }
        return "raw"
    }

    public static func detect(_ bytes: [UInt8]) -> String? {
        bytes.withUnsafeBytes { detect($0) }
    }
}
