#if canImport(Glibc)
import Glibc
#endif

/// The lowest memory limit set on this process's control group or any
/// group above it, cgroup v2 (`memory.max`) or v1
/// (`memory.limit_in_bytes`). A systemd unit's `MemoryMax=` sits on the
/// unit's own group, several levels below the root that a container sees
/// at `/sys/fs/cgroup/memory.max`.
enum CgroupMemoryLimit {
    /// The limit in bytes, or nil where none is set or none can be read.
    static func current() -> Int64? {
        guard let groups = readSmallFile("/proc/self/cgroup") else { return nil }
        return limit(groups: groups, read: readSmallFile)
    }

    /// The limit for the groups `/proc/self/cgroup` lists, reading control
    /// files through `read` (nil for a file that is not there).
    static func limit(groups: String, read: (String) -> String?) -> Int64? {
        var lowest: Int64?
        for line in groups.split(separator: "\n") {
            // "hierarchy-ID:controllers:path"; v2's line is "0::path".
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3, fields[2].hasPrefix("/") else { continue }
            let file: String
            let root: String
            if fields[0] == "0", fields[1].isEmpty {
                (root, file) = ("/sys/fs/cgroup", "memory.max")
            } else if fields[1].split(separator: ",").contains("memory") {
                (root, file) = ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
            } else {
                continue
            }
            // A group outside this cgroup namespace shows as "/../x": only
            // the namespace's root is to be seen.
            var path = fields[2].split(separator: "/").contains("..") ? "/" : String(fields[2])
            while true {
                let directory = path == "/" ? root : root + path
                if let text = read(directory + "/" + file),
                   let value = Int64(text.filter { !$0.isWhitespace }), value > 0 {
                    lowest = min(lowest ?? value, value)
                }
                guard path != "/", let slash = path.lastIndex(of: "/") else { break }
                path = slash == path.startIndex ? "/" : String(path[..<slash])
            }
        }
        return lowest
    }

    private static func readSmallFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 16384)
        let count = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        return String(decoding: bytes[0..<count], as: UTF8.self)
    }
}
