/// The writes in flight on a node, so that a read-modify-write never
/// interleaves with another write to the same bytes (QEMU's tracked
/// requests and serialising requests).
///
/// Plain aligned writes only register themselves; a serialising request
/// (padding for alignment) waits for every overlapping write, and every
/// write waits for an overlapping serialising one.
struct TrackedRequests {
    struct Entry {
        var id: UInt64
        var start: Int64
        var end: Int64
        var serialising: Bool
    }

    private struct Waiter {
        var start: Int64
        var end: Int64
        var serialising: Bool
        var resume: (UInt64) -> Void
    }

    private var active: [Entry] = []
    private var waiters: [Waiter] = []
    private var nextID: UInt64 = 1

    var isEmpty: Bool { active.isEmpty && waiters.isEmpty }

    private func conflicts(start: Int64, end: Int64, serialising: Bool) -> Bool {
        for entry in active where entry.start < end && start < entry.end {
            if serialising || entry.serialising { return true }
        }
        return false
    }

    /// True if a waiting request queued before position `limit` blocks this
    /// one: later requests never overtake an earlier overlapping one where
    /// either serialises, so a read-modify-write cannot be starved.
    private func queuedAhead(start: Int64, end: Int64, serialising: Bool, limit: Int) -> Bool {
        for waiter in waiters.prefix(limit) where waiter.start < end && start < waiter.end {
            if serialising || waiter.serialising { return true }
        }
        return false
    }

    /// Registers the request if nothing overlapping blocks it.
    mutating func tryBegin(start: Int64, end: Int64, serialising: Bool) -> UInt64? {
        guard !conflicts(start: start, end: end, serialising: serialising),
              !queuedAhead(start: start, end: end, serialising: serialising, limit: waiters.count) else { return nil }
        let id = nextID
        nextID &+= 1
        active.append(Entry(id: id, start: start, end: end, serialising: serialising))
        return id
    }

    /// Queues a request that `tryBegin` refused; `resume` runs with its id
    /// once the overlapping requests have ended.
    mutating func wait(start: Int64, end: Int64, serialising: Bool, resume: @escaping (UInt64) -> Void) {
        waiters.append(Waiter(start: start, end: end, serialising: serialising, resume: resume))
    }

    /// Ends request `id` and returns the waiters that may now start (already
    /// registered); the caller runs their `resume` outside of any mutation.
    mutating func end(_ id: UInt64) -> [(UInt64, (UInt64) -> Void)] {
        if let index = active.firstIndex(where: { $0.id == id }) {
            active.remove(at: index)
        }
        guard !waiters.isEmpty else { return [] }
        var ready: [(UInt64, (UInt64) -> Void)] = []
        var index = 0
        while index < waiters.count {
            let waiter = waiters[index]
            if conflicts(start: waiter.start, end: waiter.end, serialising: waiter.serialising)
                || queuedAhead(start: waiter.start, end: waiter.end, serialising: waiter.serialising, limit: index) {
                index += 1
                continue
            }
            let newID = nextID
            nextID &+= 1
            active.append(Entry(id: newID, start: waiter.start, end: waiter.end, serialising: waiter.serialising))
            ready.append((newID, waiter.resume))
            waiters.remove(at: index)
        }
        return ready
    }
}
