@testable import QCOW2
import Testing

/// The memory limit that bounds the refcount blocks an open may load.
@Suite struct CgroupMemoryLimitTests {
    /// A systemd unit with MemoryMax= on cgroup v2: the limit is on the
    /// unit's own group, not the root (which has no memory.max at all).
    @Test func aLimitOnANestedV2GroupIsFound() {
        let files = [
            "/sys/fs/cgroup/system.slice/strata.service/memory.max": "536870912\n",
            "/sys/fs/cgroup/system.slice/memory.max": "max\n",
        ]
        #expect(CgroupMemoryLimit.limit(groups: "0::/system.slice/strata.service\n", read: { files[$0] }) == 536_870_912)
    }

    /// The lowest limit on the way up wins; "max" and v1's huge default are no limit.
    @Test func theLowestLimitOnThePathToTheRootWins() {
        let files = [
            "/sys/fs/cgroup/a/b/memory.max": "max\n",
            "/sys/fs/cgroup/a/memory.max": "1073741824\n",
            "/sys/fs/cgroup/memory.max": "2147483648\n",
        ]
        #expect(CgroupMemoryLimit.limit(groups: "0::/a/b\n", read: { files[$0] }) == 1 << 30)
        #expect(CgroupMemoryLimit.limit(groups: "0::/\n", read: { files[$0] }) == 2 << 30)
        #expect(CgroupMemoryLimit.limit(groups: "0::/other\n", read: { _ in "max" }) == nil)
        // A group outside the cgroup namespace: only its root is read.
        let outside = ["/sys/fs/cgroup/memory.max": "4096", "/sys/fs/memory.max": "1", "/x/memory.max": "1"]
        #expect(CgroupMemoryLimit.limit(groups: "0::/../x\n", read: { outside[$0] }) == 4096)
    }

    /// cgroup v1 (or a hybrid host): the memory controller's line and its
    /// memory.limit_in_bytes; other controllers are not asked.
    @Test func aV1MemoryControllerLimitIsFound() {
        let groups = "5:devices:/x\n4:memory:/process_api/abc\n0::/\n"
        let files = [
            "/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": "268435456\n",
            "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes": "9223372036854771712\n",
            "/sys/fs/cgroup/devices/x/memory.limit_in_bytes": "1",
        ]
        #expect(CgroupMemoryLimit.limit(groups: groups, read: { files[$0] }) == 256 << 20)
        #expect(CgroupMemoryLimit.limit(groups: "garbage\n::\n3:cpu\n", read: { _ in "1" }) == nil)
    }
}
