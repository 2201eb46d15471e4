import BlockLayer
import NBDProtocol
import NIOCore
import NIOPosix

/// Listens for NBD clients and hands each connection to an
/// `NBDConnectionHandler`, on the graph's event loop.
///
/// Enforces the connection cap (`-e`): at the cap, listeners stop
/// accepting and new clients wait in the backlog, as with qemu-nbd.
public final class NBDServer {
    public struct Configuration {
        /// Most clients at once; 0 for no limit.
        public var maxConnections = 1
        public var handshakeTimeout: TimeAmount = .seconds(10)
        /// How long a shutdown waits for clients to take their last replies
        /// before closing them anyway (nil: for ever, as qemu-nbd). A client
        /// that stops reading must not hold the server, and with it the
        /// image's last flush, until a supervisor's SIGKILL.
        public var shutdownGrace: TimeAmount? = .seconds(10)
        public var log: ((String) -> Void)?
        /// Keeps the loop polling briefly after replies go out; nil: never poll.
        public var poller: LoopPoller?
        /// The loop's I/O completion bursts (`FileIOContext.completionBurst`):
        /// replies written during one are flushed as it ends. Without it,
        /// replies are flushed from a task on the loop.
        public var completionBurst: CompletionBurst?
        /// The send buffer asked for on unix-socket connections (see
        /// `cachedExportUnixSendBuffer`); nil leaves the kernel's default.
        public var unixSendBuffer: Int?
        public init() {}
    }

    /// The send buffer for unix-socket clients of an export read through
    /// the page cache.
    ///
    /// A unix socket's send buffer stays at `net.core.wmem_default` (208 KiB
    /// on Debian) unless the server asks for more, so a 256 KiB or 1 MiB
    /// READ reply takes several rounds of write, wait for the client to
    /// read, write again. TCP sizes its buffer by itself, up to `tcp_wmem`'s
    /// maximum, 4 MiB by default; this asks for the same (the kernel caps
    /// it at `net.core.wmem_max`). A client that stops reading then pins at
    /// most twice this in the kernel, as a TCP client can, next to the
    /// 32 MiB of queued replies the server allows.
    ///
    /// Measured on the benchmark VM, raw image, cache=writeback, kernel
    /// default against 4 MiB: fio 1 MiB reads QD8 904–1,202 → 2,564–2,569
    /// MiB/s; cold nbdcopy of 2 GiB over one connection 635–653 → 720–870.
    /// O_DIRECT exports went the other way (1 MiB reads 2,045–2,322 →
    /// 1,282–1,358, nbdcopy 1,468–1,672 → 1,357–1,408; 1 MiB in between),
    /// for a reason not yet found, so they keep the kernel's default.
    public static let cachedExportUnixSendBuffer = 4 << 20

    public let eventLoop: EventLoop
    public let registry: NBDExportRegistry
    public let configuration: Configuration
    private var listeners: [Channel] = []
    private var connections: [ObjectIdentifier: (Channel, NBDConnectionHandler)] = [:]
    private var acceptingPaused = false
    public private(set) var totalConnections = 0
    /// Clients the last shutdown closed at `shutdownGrace`, replies unsent.
    public private(set) var clientsClosedAtShutdownLimit = 0
    /// Called on the loop when the last client disconnects.
    public var onIdle: (() -> Void)?

    public init(eventLoop: EventLoop, registry: NBDExportRegistry, configuration: Configuration) {
        self.eventLoop = eventLoop
        self.registry = registry
        self.configuration = configuration
    }

    public var connectionCount: Int { connections.count }
    /// The open connections' channels, for tests.
    var connectionChannels: [Channel] { connections.values.map(\.0) }

    private func bootstrap() -> ServerBootstrap {
        ServerBootstrap(group: eventLoop, childGroup: eventLoop)
            .serverChannelOption(.backlog, value: 128)
            .serverChannelOption(.maxMessagesPerRead, value: 1)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            // Replies queue up to 32 MiB before new requests wait: enough to
            // keep a deep queue of large reads going (a unix socket buffer
            // holds far less), bounded against clients that stop reading.
            .childChannelOption(.writeBufferWaterMark, value: .init(low: 8 << 20, high: 32 << 20))
            .childChannelOption(.recvAllocator, value: AdaptiveRecvByteBufferAllocator(minimum: 4096, initial: 65536, maximum: 1 << 21))
            .childChannelInitializer { [unowned self] channel in
                self.accepted(channel)
            }
    }

    /// Listens on a unix socket, replacing a stale socket file.
    public func listen(unixSocket path: String) -> EventLoopFuture<Void> {
        bootstrap().bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).map { self.listeners.append($0) }
    }

    public func listen(host: String, port: Int) -> EventLoopFuture<Void> {
        bootstrap().bind(host: host, port: port).map { self.listeners.append($0) }
    }

    /// Adopts a listening socket passed by systemd (LISTEN_FDS).
    public func listen(adopting descriptor: CInt) -> EventLoopFuture<Void> {
        bootstrap().withBoundSocket(descriptor).map { self.listeners.append($0) }
    }

    public var localAddresses: [SocketAddress] { listeners.compactMap(\.localAddress) }

    private func accepted(_ channel: Channel) -> EventLoopFuture<Void> {
        let handlerConfiguration = NBDConnectionHandler.Configuration(
            handshakeTimeout: configuration.handshakeTimeout, log: configuration.log, poller: configuration.poller,
            completionBurst: configuration.completionBurst)
        let handler = NBDConnectionHandler(registry: registry, configuration: handlerConfiguration)
        if let size = configuration.unixSendBuffer, case .unixDomainSocket = channel.localAddress {
            // TCP is left alone: a fixed SO_SNDBUF would turn off its autotuning.
            _ = channel.setOption(.socketOption(.so_sndbuf), value: SocketOptionValue(size))
        }
        let id = ObjectIdentifier(channel)
        connections[id] = (channel, handler)
        totalConnections += 1
        configuration.log?("client connected (\(connections.count) now)")
        updateAccepting()
        channel.closeFuture.whenComplete { [weak self] _ in
            guard let self else { return }
            self.connections[id] = nil
            self.configuration.log?("client disconnected (\(self.connections.count) left)")
            self.updateAccepting()
            if self.connections.isEmpty { self.onIdle?() }
        }
        return channel.pipeline.addHandler(handler)
    }

    private func updateAccepting() {
        let full = configuration.maxConnections > 0 && connections.count >= configuration.maxConnections
        guard full != acceptingPaused else { return }
        acceptingPaused = full
        for listener in listeners {
            listener.setOption(.autoRead, value: !full).whenSuccess {
                if !full { listener.read() }
            }
        }
    }

    /// Stops listening, lets every client finish its requests in flight,
    /// then closes them. Succeeds when all are gone: clients still open
    /// after `shutdownGrace` (not reading their replies) are closed then,
    /// with their unsent replies dropped. Requests they have in flight still
    /// finish in the block layer; the caller drains and flushes after this.
    public func shutdown() -> EventLoopFuture<Void> {
        let closingListeners = listeners.map { $0.close() }
        listeners = []
        let clients = connections.values.map { channel, handler -> EventLoopFuture<Void> in
            handler.serverShutdown()
            return channel.closeFuture
        }
        let done = EventLoopFuture.andAllComplete(closingListeners + clients, on: eventLoop)
        guard let grace = configuration.shutdownGrace, !connections.isEmpty else { return done }
        let deadline = eventLoop.scheduleTask(in: grace) { [weak self] in
            guard let self, !self.connections.isEmpty else { return }
            self.clientsClosedAtShutdownLimit = self.connections.count
            for (_, handler) in self.connections.values { handler.close() }
        }
        done.whenComplete { _ in deadline.cancel() }
        return done
    }
}
