@testable import BlockLayer
import Testing

@Suite struct TrackedRequestsTests {
    @Test func plainWritesDoNotWaitForEachOther() {
        var tracked = TrackedRequests()
        #expect(tracked.tryBegin(start: 0, end: 100, serialising: false) != nil)
        #expect(tracked.tryBegin(start: 50, end: 150, serialising: false) != nil)
    }

    @Test func serialisingRequestsWaitForOverlapsAndBlockThem() {
        var tracked = TrackedRequests()
        let plain = tracked.tryBegin(start: 0, end: 512, serialising: false)!
        #expect(tracked.tryBegin(start: 0, end: 512, serialising: true) == nil)
        var resumed: [UInt64] = []
        tracked.wait(start: 0, end: 512, serialising: true) { resumed.append($0) }
        #expect(tracked.tryBegin(start: 600, end: 700, serialising: false) != nil, "no overlap, no wait")
        let ready = tracked.end(plain)
        #expect(ready.count == 1)
        ready.forEach { $0.1($0.0) }
        #expect(resumed.count == 1)
        #expect(tracked.tryBegin(start: 100, end: 200, serialising: false) == nil,
                "a plain write waits for the serialising one")
    }

    @Test func aWaitingReadModifyWriteIsNotOvertaken() {
        var tracked = TrackedRequests()
        let first = tracked.tryBegin(start: 0, end: 512, serialising: false)!
        var order: [String] = []
        tracked.wait(start: 0, end: 512, serialising: true) { _ in order.append("rmw") }
        #expect(tracked.tryBegin(start: 0, end: 512, serialising: false) == nil,
                "a later plain write queues behind the waiting read-modify-write")
        tracked.wait(start: 0, end: 512, serialising: false) { _ in order.append("plain") }
        let ready = tracked.end(first)
        #expect(ready.count == 1)
        ready.forEach { $0.1($0.0) }
        #expect(order == ["rmw"])
    }
}
