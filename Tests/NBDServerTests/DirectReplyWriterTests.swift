@testable import NBDServer
import NIOCore
import NIOPosix
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The writer finds a NIO channel's socket, writes to it past NIO, hands
/// what the socket will not take to its caller in order, and lets the
/// connection end when the channel closes.
@Suite final class DirectReplyWriterTests {
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    /// The NIO channel's socket and the peer, a plain descriptor.
    let channel: Channel
    let peer: CInt

    init() throws {
        var ends: [CInt] = [-1, -1]
        guard socketpair(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0, &ends) == 0 else { throw IOError(errnoCode: errno, reason: "socketpair") }
        peer = ends[1]
        channel = try ClientBootstrap(group: group).withConnectedSocket(ends[0]).wait()
    }

    deinit {
        try? channel.close().wait()
        close(peer)
        try? group.syncShutdownGracefully()
    }

    /// Sends `buffers` through a writer on the channel's loop; returns what
    /// went to `overflow`, as bytes, and whether a writer was found.
    func send(_ buffers: [ByteBuffer], closingFirst: Bool = false) throws -> (found: Bool, overflow: [UInt8]) {
        try channel.eventLoop.flatSubmit { [channel] in
            DirectReplyWriter.open(for: channel).map { writer -> (Bool, [UInt8]) in
                guard let writer else { return (false, []) }
                if closingFirst { writer.close() }
                for buffer in buffers { writer.append(buffer) }
                var overflow: [UInt8] = []
                writer.send { overflow += $0.readableBytesView }
                #expect(writer.isEmpty)
                return (true, overflow)
            }
        }.wait()
    }

    /// Everything the peer can read now.
    func received() -> [UInt8] {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let count = recv(peer, &chunk, chunk.count, CInt(MSG_DONTWAIT))
            guard count > 0 else { return bytes }
            bytes += chunk[..<count]
        }
    }

    func buffers(count: Int, length: Int) -> [ByteBuffer] {
        (0..<count).map { index in ByteBuffer(bytes: (0..<length).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ index) }) }
    }

    @Test func writesToTheChannelsSocket() throws {
        let parts = buffers(count: 3, length: 100)
        let (found, overflow) = try send(parts)
        #expect(found)
        #expect(overflow.isEmpty)
        #expect(received() == parts.flatMap { Array($0.readableBytesView) })
    }

    /// A peer that does not read: the socket takes a prefix, the rest
    /// comes back whole and in order, starting inside a buffer.
    @Test func whatTheSocketWillNotTakeComesBackInOrder() throws {
        let parts = buffers(count: 100, length: 99_999)
        let (found, overflow) = try send(parts)
        #expect(found)
        let taken = received()
        #expect(taken.count > 0 && overflow.count > 0)
        #expect(taken.count % 99_999 != 0, "the cut falls inside a buffer")
        #expect(taken + overflow == parts.flatMap { Array($0.readableBytesView) })
    }

    @Test func aClosedWriterHandsEverythingBack() throws {
        let parts = buffers(count: 2, length: 10)
        let (found, overflow) = try send(parts, closingFirst: true)
        #expect(found)
        #expect(overflow == parts.flatMap { Array($0.readableBytesView) })
        #expect(received().isEmpty)
    }

    /// The writer's duplicate of the descriptor keeps the socket open: a
    /// writer let go closes it, so the peer sees the connection end once
    /// the channel closes too.
    @Test func theConnectionEndsWhenChannelAndWriterAreGone() throws {
        #expect(try send([]).found)
        try channel.close().wait()
        var byte: UInt8 = 0
        #expect(recv(peer, &byte, 1, 0) == 0)
    }

    @Test func noDescriptorHasCookieZero() {
        #expect(DirectReplyWriter.duplicateDescriptor(withCookie: 0) == nil)
    }
}
