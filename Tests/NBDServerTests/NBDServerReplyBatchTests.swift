import BlockLayer
import Dispatch
import Foundation
import NBDProtocol
@testable import NBDServer
import NBDTestSupport
import NIOCore
import NIOPosix
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Replies of requests that finish at once go out in bounded batches, over
/// a real unix socket (the direct writer needs one): a client that
/// pipelines requests and reads no replies meets the server's read pause,
/// not a server that holds every reply it owes.
@Suite struct NBDServerReplyBatchTests {
    /// Replies past what NIO holds before reading pauses (32 MiB) and the
    /// sockets hold, so that the client stalls; the first inbound read of
    /// the requests (64 KiB) asks for 2.4 MB of replies.
    static let readLength = 1024
    static let requests = 65536

    @Test func aClientThatReadsNoRepliesMeetsBoundedBatches() throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        try withTemporaryDirectory("batch") { directory in
            var configuration = NBDServer.Configuration()
            configuration.shutdownGrace = .milliseconds(100)
            // Reads from memory finish inside the request's handling, as
            // reads from the page cache do.
            let server = try loop.submit {
                let graph = BlockGraph(eventLoop: loop)
                let node = try graph.addNode(name: "ram", driver: RAMDriver(size: 1 << 20))
                let backend = try graph.attachBackend(name: "disk", to: node, perm: [.consistentRead], shared: .all)
                let registry = NBDExportRegistry()
                try registry.add(NBDExport(name: "disk", backend: backend, readOnly: true))
                return NBDServer(eventLoop: loop, registry: registry, configuration: configuration)
            }.wait()
            defer { try? loop.flatSubmit { server.shutdown() }.wait() }
            let path = directory + "/nbd.sock"
            try loop.flatSubmit { server.listen(unixSocket: path) }.wait()

            let client = try Client(path: path)
            defer { close(client.descriptor) }
            try client.negotiate(export: "disk")
            var requests = ByteBuffer()
            for cookie in 0..<UInt64(Self.requests) {
                requests.writeImmutableBuffer(Wire.request(type: 0, cookie: cookie, length: UInt32(Self.readLength)))
            }
            let bytes = Array(requests.readableBytesView)

            // Sends until the server stops reading, reading nothing.
            let sentBeforeStall = try client.sendUntilStalled(bytes)
            #expect(sentBeforeStall < bytes.count, "the server paused before taking every request")
            let handler = try #require(try loop.submit {
                try server.connectionChannels.first?.pipeline.syncOperations.handler(type: NBDConnectionHandler.self)
            }.wait())
            let largest = try loop.submit { handler.largestReplyBatch }.wait()
            let limit = NBDConnectionHandler.Configuration().maxBatchedReplyBytes
            #expect(largest > 0, "replies went out past NIO")
            #expect(largest < limit + 16 + Self.readLength, "one batch held \(largest) bytes")

            // Then every request is answered, in order, once the client reads.
            let replyLength = 16 + Self.readLength
            let replies = Received()
            let done = DispatchSemaphore(value: 0)
            DispatchQueue(label: "reader").async {
                replies.bytes = client.read(count: Self.requests * replyLength)
                done.signal()
            }
            try client.sendAll(Array(bytes[sentBeforeStall...]))
            #expect(done.wait(timeout: .now() + 30) == .success)
            let received = replies.bytes
            try #require(received.count == Self.requests * replyLength)
            for cookie in 0..<Self.requests {
                var reply = ByteBuffer(bytes: received[(cookie * replyLength)..<(cookie * replyLength + 16)])
                #expect(reply.readInteger(as: UInt32.self) == NBDMagic.simpleReply)
                #expect(reply.readInteger(as: UInt32.self) == 0)
                guard reply.readInteger(as: UInt64.self) == UInt64(cookie) else {
                    Issue.record("reply \(cookie) is out of order")
                    break
                }
            }
        }
    }

    /// What the reader thread received (handed over by its semaphore).
    final class Received: @unchecked Sendable {
        var bytes: [UInt8] = []
    }

    /// A client on a plain descriptor, to send without reading.
    struct Client {
        let descriptor: CInt

        init(path: String) throws {
            descriptor = socket(AF_UNIX, CInt(SOCK_STREAM.rawValue), 0)
            guard descriptor >= 0 else { throw IOError(errnoCode: errno, reason: "socket") }
            let result = try SocketAddress(unixDomainSocketPath: path).withSockAddr { address, length in
                connect(descriptor, address, socklen_t(length))
            }
            guard result == 0 else {
                close(descriptor)
                throw IOError(errnoCode: errno, reason: "connect")
            }
        }

        /// Fixed newstyle without zeroes, then EXPORT_NAME.
        func negotiate(export: String) throws {
            #expect(read(count: 18).count == 18)
            var flags = ByteBuffer()
            flags.writeInteger(UInt32(3))
            try sendAll(Array(flags.readableBytesView))
            try sendAll(Array(Wire.option(1, Array(export.utf8)).readableBytesView))
            #expect(read(count: 10).count == 10)
        }

        func sendAll(_ bytes: [UInt8]) throws {
            var sent = 0
            while sent < bytes.count {
                let count = bytes[sent...].withUnsafeBytes { send(descriptor, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL)) }
                if count < 0, errno == EINTR { continue }
                guard count > 0 else { throw IOError(errnoCode: errno, reason: "send") }
                sent += count
            }
        }

        /// Sends without blocking until nothing more goes for half a
        /// second; returns how many bytes went.
        func sendUntilStalled(_ bytes: [UInt8]) throws -> Int {
            var sent = 0
            var stalledSince = DispatchTime.now()
            while sent < bytes.count {
                let count = bytes[sent...].withUnsafeBytes {
                    send(descriptor, $0.baseAddress, $0.count, CInt(MSG_NOSIGNAL) | CInt(MSG_DONTWAIT))
                }
                if count > 0 {
                    sent += count
                    stalledSince = .now()
                } else if count < 0, errno != EAGAIN, errno != EINTR {
                    throw IOError(errnoCode: errno, reason: "send")
                } else if DispatchTime.now().uptimeNanoseconds - stalledSince.uptimeNanoseconds > 500_000_000 {
                    break
                } else {
                    usleep(10_000)
                }
            }
            return sent
        }

        /// Reads `count` bytes, or fewer when the connection ends.
        func read(count: Int) -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: count)
            var filled = 0
            while filled < count {
                let got = bytes[filled...].withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
                if got < 0, errno == EINTR { continue }
                guard got > 0 else { break }
                filled += got
            }
            return Array(bytes[..<filled])
        }
    }
}
