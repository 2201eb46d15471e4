/// Clusters held as sorted, disjoint runs: for metadata that may span far
/// more clusters than is worth an entry each in a `QCOW2ClusterMap`.
///
/// The L1 tables of internal snapshots are the case: an image may name
/// 65,536 of them of up to 32 MiB each, which QEMU accepts (it checks
/// their alignment and size, not where they lie). As one map entry per
/// 512-byte cluster that is 2^32 insertions and tens of gigabytes before
/// the image opens; as runs it is one entry per table at most, and a
/// lookup is a binary search.
struct QCOW2ClusterRuns {
    /// Sorted by start; neither overlapping nor touching.
    private(set) var runs: [ClosedRange<Int64>] = []

    init() {}

    /// The runs covering `ranges`, merged where they overlap or touch.
    init(_ ranges: [ClosedRange<Int64>]) {
        for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = runs.last, range.lowerBound <= last.upperBound + 1 {
                runs[runs.count - 1] = last.lowerBound...max(last.upperBound, range.upperBound)
            } else {
                runs.append(range)
            }
        }
    }

    var isEmpty: Bool { runs.isEmpty }

    func contains(_ cluster: Int64) -> Bool {
        guard let index = lastRun(startingAtOrBefore: cluster) else { return false }
        return runs[index].upperBound >= cluster
    }

    /// The index of the last run that starts at or before `cluster`.
    private func lastRun(startingAtOrBefore cluster: Int64) -> Int? {
        var low = 0
        var high = runs.count
        while low < high {
            let middle = (low + high) / 2
            if runs[middle].lowerBound <= cluster { low = middle + 1 } else { high = middle }
        }
        return low == 0 ? nil : low - 1
    }
}
