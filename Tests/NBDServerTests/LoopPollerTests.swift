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

    /// A poller with `window` on the loop, after one activity: it and whether it polls.
    func pollerAfterActivity(window: UInt64) throws -> (LoopPoller, Bool) {
        let loop = self.loop
        return try loop.submit { () -> (LoopPoller, Bool) in
            let poller = LoopPoller(eventLoop: loop, windowNanoseconds: window)
            poller.noteActivity()
            return (poller, poller.isPolling)
        }.wait()
    }

    @Test func activityPollsUntilAWindowPassesWithoutMore() throws {
        let (poller, started) = try pollerAfterActivity(window: 2_000_000)
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
        let (poller, polling) = try pollerAfterActivity(window: 0)
        #expect(!polling)
        usleep(5_000)
        #expect(try loop.submit { poller.polls }.wait() == 0)
    }
}
