import Foundation
@testable import NBDServer
import NBDTestSupport
import NIOCore
import NIOPosix
import Testing

/// The socket options a real server sets on the connections it accepts.
@Suite struct NBDServerSocketTests {
    /// The send buffer the kernel reports for a unix connection whose
    /// server asked for `asked` bytes (nil: asked for nothing), and for a
    /// TCP connection to the same server.
    func sendBuffers(asked: Int?) throws -> (unix: Int, tcp: Int) {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let loop = group.next()
        return try withTemporaryDirectory("sndbuf") { directory in
            var configuration = NBDServer.Configuration()
            configuration.maxConnections = 0
            configuration.unixSendBuffer = asked
            configuration.shutdownGrace = .milliseconds(100)
            let server = try loop.submit { NBDServer(eventLoop: loop, registry: NBDExportRegistry(), configuration: configuration) }.wait()
            let path = directory + "/nbd.sock"
            try loop.flatSubmit { server.listen(unixSocket: path) }.wait()
            try loop.flatSubmit { server.listen(host: "127.0.0.1", port: 0) }.wait()
            let port = try #require(try loop.submit { server.localAddresses.compactMap(\.port).first }.wait())

            let clients = [
                try ClientBootstrap(group: group).connect(unixDomainSocketPath: path).wait(),
                try ClientBootstrap(group: group).connect(host: "127.0.0.1", port: port).wait(),
            ]
            defer {
                for client in clients { try? client.close().wait() }
                try? loop.flatSubmit { server.shutdown() }.wait()
            }
            var channels: [Channel] = []
            for _ in 0..<500 where channels.count < 2 {
                channels = try loop.submit { server.connectionChannels }.wait()
                if channels.count < 2 { usleep(10_000) }
            }
            try #require(channels.count == 2)
            var unix = 0
            var tcp = 0
            for channel in channels {
                let size = Int(try channel.getOption(.socketOption(.so_sndbuf)).wait())
                if case .unixDomainSocket = channel.localAddress { unix = size } else { tcp = size }
            }
            return (unix, tcp)
        }
    }

    func sysctl(_ name: String) throws -> Int {
        let text = try String(contentsOfFile: "/proc/sys/net/core/" + name, encoding: .utf8)
        return try #require(Int(text.trimmingCharacters(in: .whitespacesAndNewlines)))
    }

    /// Unix connections get the larger buffer (the kernel doubles what is
    /// asked, up to twice `wmem_max`); TCP connections keep autotuning.
    @Test func unixConnectionsAskForALargerSendBuffer() throws {
        let wmemMax = try sysctl("wmem_max")
        let defaults = try sendBuffers(asked: NBDServer.cachedExportUnixSendBuffer)
        #expect(defaults.unix == 2 * min(NBDServer.cachedExportUnixSendBuffer, wmemMax))
        let odd = 150_000
        let asked = try sendBuffers(asked: odd)
        #expect(asked.unix == 2 * min(odd, wmemMax))
        #expect(asked.tcp != 2 * min(odd, wmemMax), "TCP's buffer is not set")
    }

    @Test func withoutASizeUnixConnectionsKeepTheKernelDefault() throws {
        #expect(try sendBuffers(asked: nil).unix == sysctl("wmem_default"))
    }
}
