/// A hash map keyed by cluster numbers or cluster-aligned offsets, for the
/// lookups most requests make: the L2 cache, and the overlap check before
/// an in-place write.
///
/// `Dictionary` and `Set` hash every key with SipHash: about 90 of the
/// instructions qcow2 added to each 4 KiB request, per lookup. Keys here
/// are non-negative integers with their low bits often all zero (aligned
/// offsets), which a multiply-shift hash spreads as well; slots are probed
/// linearly, and a removal moves the entries after it back, so no
/// tombstones pile up.
///
/// The keys come from the image, which may be hostile: with a fixed
/// multiplier, an image could place its L2 tables so that all of them
/// share one run of slots, and every lookup would walk it. The multiplier
/// is random per map (any odd number gives a universal family), as
/// SipHash's seed is random per process.
struct QCOW2ClusterMap<Value> {
    /// A power of two, more than twice `count`.
    private var slots: [(key: Int64, value: Value)?] = Array(repeating: nil, count: 16)
    /// 64 minus log2 of `slots.count`: a hash's top bits pick the slot.
    private var shift: UInt64 = 60
    private let multiplier = UInt64.random(in: 0...UInt64.max) | 1
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }

    subscript(key: Int64) -> Value? {
        get { slots[slot(of: key)]?.value }
        set {
            let slot = slot(of: key)
            guard let newValue else {
                if slots[slot] != nil { remove(at: slot) }
                return
            }
            if slots[slot] == nil { count += 1 }
            slots[slot] = (key, newValue)
            if count * 2 >= slots.count { grow() }
        }
    }

    func contains(_ key: Int64) -> Bool { slots[slot(of: key)] != nil }

    /// Every key and its value, in no particular order.
    var elements: [(key: Int64, value: Value)] { slots.compactMap { $0 } }

    /// The most slots a lookup probes: the longest run of occupied slots,
    /// plus the empty one that ends it (for tests).
    var longestProbe: Int {
        var longest = 0, run = 0
        // Twice round, so that a run wrapping past the end counts whole.
        for index in 0..<2 * slots.count {
            run = slots[index & (slots.count - 1)] == nil ? 0 : run + 1
            longest = max(longest, run)
        }
        return min(longest, slots.count) + 1
    }

    /// The slot holding `key`, or the empty slot where it goes.
    @inline(__always)
    private func slot(of key: Int64) -> Int {
        let mask = slots.count - 1
        var slot = home(key)
        while let entry = slots[slot], entry.key != key {
            slot = (slot + 1) & mask
        }
        return slot
    }

    @inline(__always)
    private func home(_ key: Int64) -> Int {
        Int(truncatingIfNeeded: (UInt64(bitPattern: key) &* multiplier) >> shift)
    }

    /// Empties `hole`, then moves back into it each following entry whose
    /// probe started at or before it, so every entry stays reachable from
    /// its home slot without crossing an empty one.
    private mutating func remove(at hole: Int) {
        var hole = hole
        slots[hole] = nil
        count -= 1
        let mask = slots.count - 1
        var next = hole
        while true {
            next = (next + 1) & mask
            guard let entry = slots[next] else { return }
            let home = self.home(entry.key)
            let passesHole = hole <= next ? (home <= hole || home > next) : (home <= hole && home > next)
            if passesHole {
                slots[hole] = entry
                slots[next] = nil
                hole = next
            }
        }
    }

    private mutating func grow() {
        let old = slots
        slots = Array(repeating: nil, count: old.count * 2)
        shift -= 1
        for case let entry? in old { slots[slot(of: entry.key)] = entry }
    }
}

/// A set of clusters: the map without values.
extension QCOW2ClusterMap where Value == Void {
    mutating func insert(_ key: Int64) { self[key] = () }
    mutating func remove(_ key: Int64) { self[key] = nil }
    mutating func formUnion<Keys: Sequence<Int64>>(_ keys: Keys) {
        for key in keys { insert(key) }
    }
}
