/// Data I/O in flight, counted by epoch, and the freed clusters that I/O
/// still holds back from the allocator.
///
/// A discard can free a cluster while a read or an in-place write that
/// looked it up before is still in flight at the disk; handed to another
/// guest range meanwhile, the read would return the new owner's data, or
/// the write land in it. Counting uses per cluster costs a hash lookup on
/// every read and another at its end; counting per epoch costs an array
/// increment: a freed cluster waits for every I/O that began before it was
/// freed, not only for its own, which delays reuse by at most the longest
/// request in flight (the allocator appends meanwhile). Ranges lent out
/// for `sendfile` have no such bound (a client may leave a reply unread),
/// so they are counted per cluster instead (`QCOW2Refcounter.lentClusters`).
///
/// New I/O counts in the current epoch. Freeing clusters while I/O is in
/// flight tags them with the current epoch and opens the next, so I/O
/// begun afterwards never holds them; they are free once every epoch up
/// to theirs has drained.
struct QCOW2IOEpochs {
    /// The epoch new I/O counts in.
    private(set) var current: UInt64 = 0
    /// The oldest epoch with I/O in flight, or `current`.
    private var oldest: UInt64 = 0
    /// I/O in flight per epoch from `oldest` to `current`.
    private var counts: [Int] = [0]
    /// Freed clusters by the epoch they wait for, oldest first.
    private var held: [(epoch: UInt64, clusters: [Int64])] = []

    /// No I/O in flight and no cluster held.
    var isIdle: Bool { counts.count == 1 && counts[0] == 0 && held.isEmpty }

    /// Counts one I/O; returns its epoch, for `end`.
    mutating func begin() -> UInt64 {
        counts[counts.count - 1] += 1
        return current
    }

    /// Ends one I/O of `epoch`; returns the clusters no I/O holds any more.
    mutating func end(_ epoch: UInt64) -> [Int64] {
        let index = Int(truncatingIfNeeded: epoch &- oldest)
        guard index >= 0, index < counts.count, counts[index] > 0 else {
            assertionFailure("I/O of epoch \(epoch) ended twice, or never began")
            return []
        }
        counts[index] -= 1
        guard index == 0, counts[0] == 0, counts.count > 1 else { return [] }
        var drained = 1
        while drained < counts.count - 1, counts[drained] == 0 { drained += 1 }
        counts.removeFirst(drained)
        oldest += UInt64(drained)
        var free: [Int64] = []
        while let first = held.first, first.epoch < oldest {
            free += first.clusters
            held.removeFirst()
        }
        return free
    }

    /// Holds freshly freed `clusters` until the I/O in flight now has
    /// ended; returns them at once when there is none.
    mutating func retire(_ clusters: [Int64]) -> [Int64] {
        guard !clusters.isEmpty, counts.count > 1 || counts[0] > 0 else { return clusters }
        held.append((current, clusters))
        current += 1
        counts.append(0)
        return []
    }
}
