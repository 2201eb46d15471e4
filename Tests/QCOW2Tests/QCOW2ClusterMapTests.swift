@testable import QCOW2
import Testing

/// The hash map under the L2 cache and the overlap check must answer as a
/// `Dictionary` would, through growth and removals in the middle of probe
/// runs.
@Suite struct QCOW2ClusterMapTests {
    enum Keys: CaseIterable {
        /// Offsets of 64 KiB clusters: the low 16 bits always zero.
        case alignedOffsets
        /// Consecutive cluster numbers.
        case smallIndices
        /// Anything below 2^56.
        case wide

        func key(_ random: inout SplitMix64) -> Int64 {
            switch self {
            case .alignedOffsets: return Int64(random.next() % 4096) << 16
            case .smallIndices: return Int64(random.next() % 3000)
            case .wide: return Int64(random.next() >> 8)
            }
        }
    }

    @Test(arguments: Keys.allCases)
    func agreesWithADictionary(keys: Keys) {
        var random = SplitMix64(seed: 7)
        var map = QCOW2ClusterMap<Int>()
        var model: [Int64: Int] = [:]
        var known: [Int64] = []
        for step in 0..<30_000 {
            // Mostly keys seen before, so removals hit and runs form.
            let key = known.isEmpty || random.next() % 4 == 0
                ? keys.key(&random) : known[Int(random.next() % UInt64(known.count))]
            switch random.next() % 3 {
            case 0:
                map[key] = step
                model[key] = step
                known.append(key)
            case 1:
                map[key] = nil
                model[key] = nil
            default:
                #expect(map[key] == model[key])
                #expect(map.contains(key) == (model[key] != nil))
            }
            #expect(map.count == model.count)
            if step % 1000 == 999 {
                for (key, value) in model { #expect(map[key] == value, "key \(key) at step \(step)") }
                let elements = Dictionary(uniqueKeysWithValues: map.elements.map { ($0.key, $0.value) })
                #expect(elements == model)
            }
        }
        // Emptied, it finds nothing.
        for key in model.keys { map[key] = nil }
        #expect(map.isEmpty && map.elements.isEmpty)
        #expect(known.allSatisfy { map[$0] == nil })
    }

    /// Keys chosen to share one home slot under a fixed multiplier (the
    /// golden ratio's, which this map used at first) would make one run
    /// as long as the map; with a random multiplier they spread.
    @Test func keysBuiltToCollideDoNotFormOneRun() {
        let golden: UInt64 = 0x9E37_79B9_7F4A_7C15
        var inverse = golden
        for _ in 0..<6 { inverse = inverse &* (2 &- golden &* inverse) }
        #expect(golden &* inverse == 1)
        // Times the golden multiplier, each of these gives 0x15 << 58 plus
        // at most 12 low bits: one home slot, whatever the table size.
        let keys = (0..<UInt64(4096)).map { Int64(bitPattern: inverse &* (0x15 << 58 | $0)) }
        var map = QCOW2ClusterMap<Void>()
        for key in keys { map.insert(key) }
        #expect(map.count == 4096 && keys.allSatisfy(map.contains))
        #expect(map.longestProbe < 200, "longest probe \(map.longestProbe) of 4096 keys")
    }

    @Test func aClusterSetInsertsRemovesAndUnites() {
        var set = QCOW2ClusterMap<Void>()
        set.insert(0)
        set.insert(0)
        set.formUnion([1, 2, 3, 1 << 40])
        #expect(set.count == 5)
        #expect(set.contains(0) && set.contains(1 << 40) && !set.contains(4))
        set.remove(2)
        set.remove(2)
        #expect(set.count == 4 && !set.contains(2) && set.contains(3))
    }
}
