@testable import NBDServer
import NIOCore
import NIOPosix
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The poller keeps a real loop busy after activity and lets it sleep again.
@Suite final class LoopPollerTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    var loop: EventLoop { group.next() }

    deinit { try? group.syncShutdownGracefully() }

    /// Waits, up to a generous bound, until the poller has stopped.
    func waitUntilIdle(_ poller: LoopPoller) throws -> Bool {
        for _ in 0..<1000 {
            if try loop.submit({ !poller.isPolling }).wait() { return true }
            usleep(5_000)
        }
        return false
    }

    @Test func activityPollsUntilAWindowPassesWithoutMore() throws {
        let loop = self.loop
        let poller = try loop.submit { LoopPoller(eventLoop: loop, windowNanoseconds: 2_000_000) }.wait()
        let started = try loop.submit { () -> Bool in
            poller.noteActivity()
            return poller.isPolling
        }.wait()
        #expect(started)
        #expect(try waitUntilIdle(poller))
        // It re-queued itself while the window lasted, then stopped for good.
        let polls = try loop.submit { poller.polls }.wait()
        #expect(polls > 1)
        usleep(10_000)
        #expect(try loop.submit { poller.polls }.wait() == polls)
    }

    @Test func activityAfterItStoppedStartsItAgain() throws {
        let loop = self.loop
        let poller = try loop.submit { LoopPoller(eventLoop: loop, windowNanoseconds: 1_000_000) }.wait()
        try loop.submit {
            for _ in 0..<100 { poller.noteActivity() }
        }.wait()
        #expect(try waitUntilIdle(poller))
        let polls = try loop.submit { poller.polls }.wait()
        try loop.submit { poller.noteActivity() }.wait()
        #expect(try waitUntilIdle(poller))
        #expect(try loop.submit { poller.polls }.wait() > polls)
    }

    @Test func aZeroWindowNeverPolls() throws {
        let loop = self.loop
        let poller = try loop.submit { LoopPoller(eventLoop: loop, windowNanoseconds: 0) }.wait()
        let polling = try loop.submit { () -> Bool in
            poller.noteActivity()
            return poller.isPolling
        }.wait()
        #expect(!polling)
        usleep(5_000)
        #expect(try loop.submit { poller.polls }.wait() == 0)
    }
}
