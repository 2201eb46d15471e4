@testable import QCOW2
import Testing

/// A freed cluster goes back to the allocator only after every I/O that
/// was in flight when it was freed has ended, and once nothing is in
/// flight, nothing stays held.
@Suite struct QCOW2IOEpochsTests {
    @Test func aFreedClusterWaitsForTheIOBeforeItNotAfter() {
        var epochs = QCOW2IOEpochs()
        let before = epochs.begin()
        #expect(epochs.retire([7]).isEmpty)
        let after = epochs.begin()
        #expect(epochs.end(after).isEmpty, "later I/O does not hold it")
        #expect(epochs.end(before) == [7])
        #expect(epochs.isIdle)
    }

    @Test func withNothingInFlightAFreedClusterIsFreeAtOnce() {
        var epochs = QCOW2IOEpochs()
        #expect(epochs.retire([3, 4]) == [3, 4])
        let io = epochs.begin()
        #expect(epochs.end(io).isEmpty)
        #expect(epochs.retire([5]) == [5])
        #expect(epochs.isIdle)
    }

    @Test func clustersAreFreedInTheOrderTheirIODrains() {
        var epochs = QCOW2IOEpochs()
        let first = epochs.begin()
        #expect(epochs.retire([1]).isEmpty)
        let second = epochs.begin()
        #expect(epochs.retire([2]).isEmpty)
        #expect(epochs.end(second).isEmpty, "the first I/O holds both")
        #expect(epochs.end(first) == [1, 2])
        #expect(epochs.isIdle)
    }

    /// Random begins, ends and frees against a model that remembers, for
    /// each freed cluster, exactly which I/O was in flight when it was
    /// freed: never free early, never twice, and nothing held once idle.
    @Test func matchesAModelOfWhichIOEachFreeWaitsFor() {
        var generator = SplitMix64(seed: 0x5eed)
        for _ in 0..<200 {
            var epochs = QCOW2IOEpochs()
            var inFlight: [(id: Int, epoch: UInt64)] = []
            var waitsFor: [Int64: Set<Int>] = [:]
            var freed: Set<Int64> = []
            var nextID = 0
            var nextCluster: Int64 = 0
            func finish(_ io: (id: Int, epoch: UInt64)) {
                for cluster in waitsFor.keys { waitsFor[cluster]?.remove(io.id) }
                take(epochs.end(io.epoch))
            }
            func take(_ clusters: [Int64]) {
                for cluster in clusters {
                    #expect(waitsFor[cluster]?.isEmpty == true, "cluster \(cluster) freed while I/O that saw it runs")
                    #expect(freed.insert(cluster).inserted, "cluster \(cluster) freed twice")
                    waitsFor[cluster] = nil
                }
            }
            for _ in 0..<100 {
                switch generator.next() % 3 {
                case 0:
                    inFlight.append((nextID, epochs.begin()))
                    nextID += 1
                case 1 where !inFlight.isEmpty:
                    finish(inFlight.remove(at: Int(generator.next() % UInt64(inFlight.count))))
                default:
                    let clusters = (0..<Int(generator.next() % 3)).map { _ in nextCluster += 1; return nextCluster }
                    for cluster in clusters { waitsFor[cluster] = Set(inFlight.map(\.id)) }
                    take(epochs.retire(clusters))
                }
            }
            while let io = inFlight.popLast() { finish(io) }
            #expect(waitsFor.isEmpty, "nothing is held once no I/O is in flight")
            #expect(epochs.isIdle)
        }
    }
}
