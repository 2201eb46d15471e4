/// A warning an image open prints, worded as QEMU's tools word it.
///
/// Most are QEMU's `warn_report` messages, which the tool prints after its
/// name ("qemu-img: warning: …"); a few (the probed raw image's) QEMU
/// prints as they are. The tool that opened the image chooses the name.
public struct ImageOpenWarning: Sendable, Equatable {
    /// The message, without the tool's name; it may run over several lines.
    public var text: String
    /// Whether it follows "<tool>: warning: ".
    public var isReport: Bool

    public init(_ text: String, isReport: Bool = true) {
        self.text = text
        self.isReport = isReport
    }

    /// The warning as `tool` prints it ("strata img", "strata").
    public func formatted(tool: String) -> String {
        isReport ? "\(tool): warning: \(text)" : text
    }

    /// QEMU's words for a qcow2 image whose bitmaps are stale: the header
    /// keeps a bitmaps extension without its autoclear bit.
    static func staleBitmaps(version: UInt32) -> ImageOpenWarning {
        let what = version < 3
            ? "This qcow2 v2 image contains bitmaps, but they may have been modified by a program without persistent bitmap support; so now they must all be considered inconsistent"
            : "a program lacking bitmap support modified this file, so all bitmaps are now considered inconsistent"
        return ImageOpenWarning("""
            \(what)
            Some clusters may be leaked, run 'strata img check -r' on the image file to fix.
            """)
    }
}
