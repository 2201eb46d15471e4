import BlockLayer
import NBDProtocol
import NIOCore

/// One client connection: negotiation, then requests to the export's
/// backend and replies back, all on the graph's event loop.
///
/// Requests are parsed straight out of the inbound buffer. Short WRITE
/// payloads are slices of it; long ones are copied once, as they arrive,
/// into a buffer of their own aligned for the export's node, so neither the
/// inbound buffer nor an O_DIRECT bounce copies them again (see
/// `NBDRequestDecoder`). Replies complete out of order and are
/// flushed once per batch: per burst of I/O completions, per inbound read,
/// or else per loop tick; straight to the socket while NIO holds none of
/// them (see `DirectReplyWriter`). Parsing and reading pause while too many
/// requests or bytes are in flight, or while the client is not reading its
/// replies (the channel is not writable), so no client can make the server
/// buffer without bound.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = IOData

    struct Configuration {
        var handshakeTimeout: TimeAmount = .seconds(10)
        /// Requests in flight before reading pauses.
        var maxInFlight = 256
        /// Payload bytes (read and written) in flight before reading pauses.
        var maxInFlightBytes = 64 << 20
        /// Reply bytes one inbound read may gather before they are sent.
        /// Requests that finish inside `handle` (reads from the page cache,
        /// block status, refusals) never count as in flight, and their
        /// replies wait for the end of the read to go out in one `sendmsg`:
        /// without a bound, 2 MiB of 28-byte READ headers from a client
        /// that reads nothing would have the server hold gigabytes. Once
        /// sent, what the socket does not take goes to NIO, whose
        /// writability pauses reading.
        var maxBatchedReplyBytes = 1 << 20
        /// WRITE payloads from this length on get a buffer of their own. On
        /// the benchmark VM, 1 MiB O_DIRECT writes spent 58 % of the
        /// server's CPU in copies when they were slices: the bounce into
        /// aligned memory, and the inbound buffer copied whole whenever bytes
        /// were appended or discarded while a slice of it was in flight.
        var streamingThreshold = 64 << 10
        /// READs from this length on whose data is all in the page cache go
        /// out with `sendfile` (see `CachedFileExtent`). Shorter ones are
        /// copied on the loop, where that costs less than the two syscalls.
        var smallestCachedSend = 64 << 10
        var log: ((String) -> Void)?
        var poller: LoopPoller?
        var completionBurst: CompletionBurst?
    }

    private enum Phase {
        case negotiating
        case transmission
        case closed
    }

    let registry: NBDExportRegistry
    let configuration: Configuration
    private var phase: Phase = .negotiating
    private var handshakeDecoder = NBDHandshakeDecoder()
    private var negotiation = NBDNegotiation()
    private var requestDecoder: NBDRequestDecoder
    private var cumulation: ByteBuffer?
    /// Bytes received and not parsed yet, for tests of their bound.
    var unparsedBytes: Int { cumulation?.readableBytes ?? 0 }
    /// Whether `cumulation` is a buffer of the connection's own that holds
    /// the start of a message split across reads (see `joinSplitMessage`),
    /// not a read's buffer.
    private var cumulationIsOwn = false
    /// Bytes `joinSplitMessage` has copied, for tests of its bound.
    private(set) var bytesJoined = 0
    /// A WRITE whose payload is arriving into a buffer of its own, or being
    /// skipped (nil) when the request is refused anyway.
    private var incomingWrite: (request: NBDRequest, payload: ByteBuffer?)?
    private var handshakeDeadline: Scheduled<Void>?
    private(set) var context: ChannelHandlerContext!
    /// The channel has closed and taken this handler out of its pipeline.
    private var removed = false

    // Transmission state.
    private(set) var session: NBDSession!
    private(set) var export: NBDExport!
    private(set) var inFlight = 0
    private(set) var inFlightBytes = 0
    private var readsPaused = false
    private var readPending = false
    /// Why no new request is started: DISC received, the client closed its
    /// side, or the server is shutting down.
    private enum Ending { case client, server }
    private var ending: Ending?
    /// The client closed its side. Requests it sent before that may still
    /// wait in `cumulation` (parsing pauses while too many are in flight,
    /// but NIO reads to the end at EOF): they are answered first, as
    /// qemu-nbd answers what it still finds in the socket.
    private var inputClosed = false
    private var inReadBatch = false
    private var flushScheduled = false
    /// Replies written since the last flush.
    private var repliesSinceFlush = 0
    /// Whether anything was written since the last flush.
    private var unflushed = false
    /// Header-only replies not yet written (to the direct writer or the
    /// channel): gathered in one buffer per flush, not a buffer and a
    /// pending write each, and the buffer reused once nothing else holds it.
    private var shortReplies: ByteBuffer?
    /// READs that have been answered, for the next ones to take.
    var idleReads: [NBDPendingRead] = []
    /// Writes replies past NIO while NIO holds none (see
    /// `DirectReplyWriter`); nil before transmission, after the channel
    /// closes, and where the socket's descriptor was not found.
    private var directWriter: DirectReplyWriter?
    /// NIO may hold writes of this connection not yet on the socket (the
    /// greeting, at first): until NIO says it holds none, writes go
    /// through it, to stay in order.
    private var channelHoldsWrites = true
    /// NIO holds writes not yet flushed.
    private var channelUnflushed = false

    init(registry: NBDExportRegistry, configuration: Configuration) {
        self.registry = registry
        self.configuration = configuration
        requestDecoder = NBDRequestDecoder(streamingThreshold: configuration.streamingThreshold)
    }

    var allocator: ByteBufferAllocator { context.channel.allocator }

    func log(_ message: @autoclosure () -> String) {
        configuration.log?(message())
    }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        // Closed, whichever way it went (a channel closed before it was
        // active sends no channelInactive): nothing may write any more.
        phase = .closed
        handshakeDeadline?.cancel()
        closeDirectWriter()
        removed = true
        releaseContextWhenIdle()
    }

    /// The context holds this handler, and this handler the context: kept,
    /// the pair would outlive the connection (about a kilobyte each). Replies
    /// to requests still in flight go through it (to the closed channel), so
    /// it is let go once the last one has ended.
    private func releaseContextWhenIdle() {
        if removed, inFlight == 0 { context = nil }
    }

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        NBDNegotiation.writeGreeting(into: &greeting)
        context.writeAndFlush(wrapOutboundOut(.byteBuffer(greeting)), promise: nil)
        handshakeDeadline = context.eventLoop.scheduleTask(in: configuration.handshakeTimeout) { [weak self] in
            guard let self, self.phase == .negotiating else { return }
            self.log("closing connection: negotiation took longer than \(self.configuration.handshakeTimeout)")
            self.close()
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        phase = .closed
        closeDirectWriter()
        handshakeDeadline?.cancel()
        cumulation = nil
        incomingWrite = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        // After DISC the client may send nothing more: what it sends anyway
        // is dropped, or a client that neither reads its last replies nor
        // stops writing would grow the buffer without end.
        guard phase != .closed, ending != .client else { return }
        inReadBatch = true
        defer { inReadBatch = false }
        if cumulation != nil, cumulation!.readableBytes > 0, !joinSplitMessage(from: &incoming) { return }
        if cumulation == nil || cumulation!.readableBytes == 0 {
            cumulation = incoming
            cumulationIsOwn = false
        } else {
            cumulation!.writeBuffer(&incoming)
        }
        process()
    }

    /// The last read ended inside a message (a request header, or a short
    /// WRITE with its payload): completes it from the front of `incoming`
    /// and parses it, so the rest of the read can be parsed in place.
    /// Appending the whole read to the last one instead would copy all of
    /// it, and all of the last one too while slices of it (short WRITE
    /// payloads) are in flight. The split message's start moves once to a
    /// buffer of its own, which later reads append to until the message is
    /// whole. Each try appends twice as much as the last, so the bytes
    /// copied stay within three times the message's length (plus 64)
    /// however many reads it takes. False when nothing is left to parse.
    private func joinSplitMessage(from incoming: inout ByteBuffer) -> Bool {
        var length = 64
        if !cumulationIsOwn {
            var start = allocator.buffer(capacity: cumulation!.readableBytes + length)
            bytesJoined += cumulation!.readableBytes
            start.writeBuffer(&cumulation!)
            cumulation = start
            cumulationIsOwn = true
        }
        while incoming.readableBytes > 0 {
            length = min(incoming.readableBytes, length)
            var front = incoming.readSlice(length: length)!
            bytesJoined += length
            cumulation!.writeBuffer(&front)
            process()
            guard phase != .closed else { return false }
            let leftover = cumulation?.readableBytes ?? 0
            if leftover <= length {
                // The split message is done; what follows it is still in `incoming`.
                incoming.moveReaderIndex(to: incoming.readerIndex - leftover)
                cumulation = nil
                return true
            }
            if readsPaused { return true }
            length *= 2
        }
        return false
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushReplies()
        if let buffer = cumulation {
            if buffer.readableBytes == 0 {
                cumulation = nil
            } else if buffer.readerIndex > 1 << 20 {
                cumulation!.discardReadBytes()
            }
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        updatePause()
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, event == .inputClosed {
            // The client will send nothing more (half-close after DISC, or
            // gone): answer what it sent, then close.
            inputClosed = true
            if phase != .transmission || cumulation == nil {
                disconnectWhenIdle(reason: .client)
            } else if !readsPaused {
                process()
            }
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        log("connection error: \(error)")
        close()
    }

    /// Outbound read: held back while too many requests are in flight, and
    /// for good after DISC. Whatever a client sends after DISC is dropped
    /// (`channelRead`); not reading it at all costs no CPU, and a client
    /// that keeps writing then waits on its own full socket, as with
    /// qemu-nbd, which stops reading at DISC too.
    func read(context: ChannelHandlerContext) {
        if readsPaused || ending == .client {
            readPending = true
        } else {
            context.read()
        }
    }

    // MARK: parsing

    /// True while nothing more may be parsed: too much in flight, or the
    /// client is not reading what was already sent.
    private var mustPause: Bool {
        inFlight >= configuration.maxInFlight || inFlightBytes >= configuration.maxInFlightBytes
            || !context.channel.isWritable
    }

    private func process() {
        while cumulation != nil {
            if mustPause {
                readsPaused = true
                return
            }
            switch phase {
            case .closed:
                return
            case .negotiating:
                guard negotiateStep() else { return }
            case .transmission:
                transmissionStep()
                return
            }
        }
    }

    /// Handles one negotiation message; false when more bytes are needed
    /// or the connection ended.
    private func negotiateStep() -> Bool {
        let message: NBDHandshakeDecoder.Message
        do {
            guard let next = try handshakeDecoder.next(&cumulation!) else { return false }
            message = next
        } catch {
            log("closing connection: \(error)")
            close()
            return false
        }
        var out = allocator.buffer(capacity: 256)
        let action = negotiation.receive(message, catalog: registry, into: &out)
        if out.readableBytes > 0 {
            write(.byteBuffer(out))
        }
        switch action {
        case .proceed:
            return true
        case .startTransmission(let session):
            guard let export = registry.export(named: session.export.name) else {
                close()
                return false
            }
            handshakeDeadline?.cancel()
            self.session = session
            self.export = export
            phase = .transmission
            // Complete at once: the lookup runs on the loop. (A writer not
            // kept closes its descriptor as it goes.)
            DirectReplyWriter.open(for: context.channel).whenSuccess { [weak self] writer in
                guard let self, self.phase == .transmission else { return }
                self.directWriter = writer
            }
            log("client entered transmission on export '\(export.name)' (structured replies: \(session.structuredReplies))")
            return true
        case .close(let reason):
            log("closing connection: \(reason)")
            context.flush()
            close()
            return false
        }
    }

    private func transmissionStep() {
        while phase == .transmission {
            if batchedReplyBytes >= configuration.maxBatchedReplyBytes {
                flushReplies()
            }
            if mustPause {
                readsPaused = true
                return
            }
            guard let request = nextRequest() else {
                // Everything received is parsed; what is left is part of a request.
                if inputClosed, phase == .transmission { disconnectWhenIdle(reason: .client) }
                return
            }
            switch ending {
            case nil:
                handle(request)
            case .server:
                // Received before the shutdown but not started: the spec's
                // answer, to each of them. Not counted as in flight: ending
                // it would close the connection before the next one is
                // answered (whoever ends the shutdown closes it).
                if request.command != .disconnect {
                    sendError(cookie: request.cookie, error: .eshutdown, message: "server is shutting down")
                }
            case .client:
                return
            }
        }
    }

    /// The next whole request; nil when more bytes are needed or the
    /// stream is lost (the connection is then closed). A long WRITE's
    /// payload is copied into a buffer of its own as it arrives, or skipped
    /// without a buffer when the request's header is refused already.
    private func nextRequest() -> NBDRequest? {
        if incomingWrite == nil {
            let request: NBDRequest
            do {
                guard let next = try requestDecoder.next(&cumulation!) else { return nil }
                request = next
            } catch {
                log("closing connection: \(error)")
                close()
                return nil
            }
            guard request.payloadFollows else { return request }
            let refused = NBDRequestValidation.check(request, session: session) != nil
            incomingWrite = (request, refused ? nil : transferBuffer(length: Int(request.length)))
        }
        // Dropped while filling, so the payload's storage is unique and
        // appending to it never copies it.
        var incoming = incomingWrite!
        incomingWrite = nil
        guard requestDecoder.takePayload(from: &cumulation!, into: &incoming.payload) else {
            incomingWrite = incoming
            return nil
        }
        incoming.request.payload = incoming.payload
        return incoming.request
    }

    // MARK: request lifetime

    func beginRequest(bytes: Int) {
        inFlight += 1
        inFlightBytes += bytes
    }

    /// Called when a request's reply has been written.
    func endRequest(bytes: Int) {
        defer { releaseContextWhenIdle() }
        inFlight -= 1
        inFlightBytes -= bytes
        repliesSinceFlush += 1
        scheduleFlush()
        if ending != nil {
            // Requests queued behind the limits get their ESHUTDOWN first.
            if ending == .server, readsPaused { updatePause() }
            if inFlight == 0 { finishAndClose() }
            return
        }
        if readsPaused { updatePause() }
    }

    /// Resumes parsing and reading once nothing holds them back.
    private func updatePause() {
        guard phase != .closed, readsPaused, !mustPause else { return }
        readsPaused = false
        if cumulation != nil, !inReadBatch { process() }
        if !readsPaused, readPending {
            readPending = false
            context.read()
        }
    }

    /// Writes a reply part; flushing is batched (see `write`).
    func send(_ buffer: ByteBuffer) {
        write(.byteBuffer(buffer))
    }

    /// Writes a header-only reply, which `encode` appends, with the others
    /// of this flush (see `shortReplies`).
    func sendShort(_ encode: (inout ByteBuffer) -> Void) {
        if shortReplies == nil {
            shortReplies = allocator.buffer(capacity: 512)
        } else if shortReplies!.readableBytes == 0 {
            shortReplies!.clear()  // no allocation unless the channel still holds it
        }
        encode(&shortReplies!)
        unflushed = true
        scheduleFlush()
    }

    /// Hands the gathered header-only replies on (see `enqueue`), ahead of
    /// whatever is written next.
    private func writeShortReplies() {
        guard let replies = shortReplies, replies.readableBytes > 0 else { return }
        enqueue(.byteBuffer(replies), promise: nil)
        shortReplies!.moveReaderIndex(to: replies.writerIndex)
    }

    /// Writes a file range (READ data the kernel sends from the page
    /// cache); `sent` runs once it has reached the socket, or failed to.
    func send(_ region: FileRegion, sent: @escaping () -> Void) {
        let promise = context.eventLoop.makePromise(of: Void.self)
        promise.futureResult.whenComplete { _ in sent() }
        write(.fileRegion(region), promise: promise)
    }

    /// Every write goes out with the next flush: the inbound read's, the
    /// completion burst's, or else one scheduled here (a negotiation reply
    /// written when a paused connection resumes, say).
    private func write(_ data: IOData, promise: EventLoopPromise<Void>? = nil) {
        writeShortReplies()
        unflushed = true
        enqueue(data, promise: promise)
        scheduleFlush()
    }

    /// Batches `data` for the direct writer while NIO holds nothing of this
    /// connection, or else hands it to NIO after the batch, so the stream
    /// stays in order. Writes with a promise (file ranges) always go through
    /// NIO, which knows when they are sent.
    private func enqueue(_ data: IOData, promise: EventLoopPromise<Void>?) {
        if let writer = directWriter, promise == nil, case .byteBuffer(let buffer) = data, channelIsDrained() {
            writer.append(buffer)
            return
        }
        sendDirectBatch()
        channelHoldsWrites = true
        channelUnflushed = true
        context.write(wrapOutboundOut(data), promise: promise)
    }

    /// Reply bytes gathered for the next flush and not handed to NIO.
    private var batchedReplyBytes: Int {
        (directWriter?.pendingBytes ?? 0) + (shortReplies?.readableBytes ?? 0)
    }

    /// The most reply bytes one flush sent past NIO, for tests of
    /// `maxBatchedReplyBytes`.
    var largestReplyBatch: Int { directWriter?.largestBatch ?? 0 }

    /// Whether NIO has nothing of this connection left to send; asked of
    /// the channel only while it may have.
    private func channelIsDrained() -> Bool {
        if channelHoldsWrites, (try? context.channel.syncOptions?.getOption(.bufferedWritableBytes)) == 0 {
            channelHoldsWrites = false
        }
        return !channelHoldsWrites
    }

    /// Sends the direct writer's batch; what the socket does not take now
    /// goes to NIO, ahead of anything written after it.
    private func sendDirectBatch() {
        guard let writer = directWriter, !writer.isEmpty else { return }
        writer.send { rest in
            channelHoldsWrites = true
            channelUnflushed = true
            context.write(wrapOutboundOut(.byteBuffer(rest)), promise: nil)
        }
    }

    private func closeDirectWriter() {
        directWriter?.close()
        directWriter = nil
    }

    /// Sends what is written. After replies the client's next request is
    /// usually a few microseconds away, so the loop polls for it instead of
    /// sleeping (see `LoopPoller`); waits for the disk are too long for that.
    private func flushReplies() {
        // Most inbound reads only start requests: nothing to flush then,
        // and an empty flush still walks the pipeline.
        if unflushed {
            unflushed = false
            writeShortReplies()
            sendDirectBatch()
            if channelUnflushed {
                channelUnflushed = false
                context.flush()
            }
        }
        // (A sendfile reply ends once sent, maybe after its flush.)
        if repliesSinceFlush > 0 {
            repliesSinceFlush = 0
            configuration.poller?.noteActivity()
        }
    }

    private func scheduleFlush() {
        guard !inReadBatch, !flushScheduled else { return }
        flushScheduled = true
        if let burst = configuration.completionBurst, burst.notifyWhenEnded(self) { return }
        context.eventLoop.execute { [weak self] in self?.flushScheduledReplies() }
    }

    private func flushScheduledReplies() {
        flushScheduled = false
        if phase != .closed { flushReplies() }
    }

    /// NBD_CMD_DISC, a half-closed client, or server shutdown: answer what
    /// is in flight, then close.
    private func disconnectWhenIdle(reason: Ending) {
        guard ending == nil else { return }
        ending = reason
        if phase == .negotiating {
            close()
            return
        }
        if reason == .server, cumulation != nil, !inReadBatch { process() }
        if inFlight == 0 { finishAndClose() }
    }

    /// NBD_CMD_DISC from the client.
    func clientDisconnected() {
        disconnectWhenIdle(reason: .client)
    }

    /// Called by the server when it shuts down.
    func serverShutdown() {
        disconnectWhenIdle(reason: .server)
    }

    /// Closes once every reply written so far has reached the socket: a
    /// plain close would drop replies still queued.
    private func finishAndClose() {
        guard phase != .closed else { return }
        let done = context.eventLoop.makePromise(of: Void.self)
        writeShortReplies()
        sendDirectBatch()
        channelUnflushed = false
        context.writeAndFlush(wrapOutboundOut(.byteBuffer(allocator.buffer(capacity: 0))), promise: done)
        done.futureResult.whenComplete { [weak self] _ in self?.close() }
    }

    func close() {
        guard phase != .closed else { return }
        phase = .closed
        closeDirectWriter()
        context.close(promise: nil)
    }
}

extension NBDConnectionHandler: CompletionBurstListener {
    /// Flushes the replies the burst's completions wrote.
    func completionBurstEnded() {
        flushScheduledReplies()
    }
}
