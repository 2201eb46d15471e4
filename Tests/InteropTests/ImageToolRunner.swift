import Foundation

/// `strata img` and `qemu-img` side by side, for the suites that compare
/// the two tools' reports and images.
protocol ImageToolRunner {}

extension ImageToolRunner {
    func img(_ arguments: [String]) throws -> Harness.Output {
        try Harness.run(Harness.strata, ["img"] + arguments)
    }

    func qemuImg(_ arguments: [String]) throws -> Harness.Output {
        try Harness.run("/usr/bin/qemu-img", arguments)
    }

    /// `qemu-img info --output=json` of `path`, parsed.
    func qemuInfo(_ path: String) throws -> [String: Any] {
        let info = try qemuImg(["info", "--output=json", path])
        return try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any] ?? [:]
    }
}

extension Harness.Output {
    /// stderr as qemu-img would print it: the tool's own name in its error
    /// lines, and `theirs` (qemu-img's copy of the image) for `ours`.
    func stderrAsQemuImg(ours: String? = nil, theirs: String = "") -> String {
        let renamed = stderr.replacingOccurrences(of: "strata img: ", with: "qemu-img: ")
        guard let ours else { return renamed }
        return renamed.replacingOccurrences(of: ours, with: theirs)
    }
}
