import NIOCore

/// The user at the top of a graph branch: an NBD export, later a job
/// (QEMU's BlockBackend). It holds permissions on its root node, counts
/// requests in flight and queues new ones while drained, so the graph below
/// can change under live clients.
public final class BlockBackend: BlockParent, InFlightRequestOwner {
    public let name: String
    public unowned let graph: BlockGraph
    public internal(set) var root: BlockChild?
    /// Writes get FUA (`cache=writethrough`/`directsync`).
    public var writeThrough = false

    public private(set) var inFlight = 0
    private var quiesceCount = 0
    private var queued: [() -> Void] = []
    private var drainPromises: [EventLoopPromise<Void>] = []
    /// Requests that have ended, for the next ones to take.
    private(set) var idleRequests: [InFlightRequest] = []

    init(name: String, graph: BlockGraph) {
        self.name = name
        self.graph = graph
    }

    public var parentDescription: String { "block device '\(name)'" }
    public var node: BlockNode? { root?.node }
    public var length: Int64 { root?.node.length ?? 0 }
    public var isQuiesced: Bool { quiesceCount > 0 }

    // MARK: requests

    /// Counts a request in flight on the root node. Callers queue while
    /// drained first, so the retry closure is only built when needed (not
    /// once per request on the hot path).
    @inline(__always)
    private func begin() -> BlockNode? {
        guard let node = root?.node else { return nil }
        inFlight += 1
        return node
    }

    @inline(__always)
    private func end() {
        inFlight -= 1
        if inFlight == 0, !drainPromises.isEmpty {
            let promises = drainPromises
            drainPromises = []
            promises.forEach { $0.succeed(()) }
        }
    }

    /// `completion`, wrapped to end the request `begin` counted before it
    /// runs.
    @inline(__always)
    private func ending(_ completion: @escaping BlockCompletion) -> BlockCompletion {
        let request = idleRequests.popLast() ?? InFlightRequest()
        request.begin(owner: self, completion: completion)
        return { error in request.end(error) }
    }

    /// A request counted by `begin` has ended; its record is free again.
    public func inFlightRequestEnded(_ request: InFlightRequest, tag: UInt64) {
        end()
        idleRequests.append(request)
    }

    private static let noMedium = BlockError(errno: 123 /* ENOMEDIUM */, "no medium")

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: BlockRequestFlags = [], completion: @escaping BlockCompletion) {
        if quiesceCount > 0 { return queued.append { self.read(at: offset, into: buffer, flags: flags, completion: completion) } }
        guard let node = begin() else { return completion(Self.noMedium) }
        node.read(at: offset, into: buffer, flags: flags, completion: ending(completion))
    }

    /// Starts a read that the caller hands to the kernel as a file range
    /// (`CachedFileExtent`), when the graph has the whole range cached. It
    /// stays in flight, so a drain waits for it, until the caller has sent
    /// it and calls `endCachedRead(_:)`. Nil (and nothing started) while
    /// drained or when the range is not cached: then `read` as usual.
    public func beginCachedRead(at offset: Int64, length: Int) -> CachedFileExtent? {
        guard quiesceCount == 0, let extent = root?.node.cachedFileExtent(at: offset, length: length) else {
            return nil
        }
        _ = begin()
        return extent
    }

    /// Ends a read started by `beginCachedRead`: what the extent covers may
    /// change from now on.
    public func endCachedRead(_ extent: CachedFileExtent) {
        extent.holder?.release(extent)
        end()
    }

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                      flags: BlockRequestFlags = [], completion: @escaping BlockCompletion) {
        if quiesceCount > 0 { return queued.append { self.write(at: offset, from: buffer, flags: flags, completion: completion) } }
        guard let node = begin() else { return completion(Self.noMedium) }
        let flags = writeThrough ? flags.union(.fua) : flags
        node.write(at: offset, from: buffer, flags: flags, completion: ending(completion))
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                            completion: @escaping BlockCompletion) {
        if quiesceCount > 0 { return queued.append { self.writeZeroes(at: offset, length: length, flags: flags, completion: completion) } }
        guard let node = begin() else { return completion(Self.noMedium) }
        let flags = writeThrough ? flags.union(.fua) : flags
        node.writeZeroes(at: offset, length: length, flags: flags, completion: ending(completion))
    }

    public func discard(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        if quiesceCount > 0 { return queued.append { self.discard(at: offset, length: length, completion: completion) } }
        guard let node = begin() else { return completion(Self.noMedium) }
        node.discard(at: offset, length: length, completion: ending(completion))
    }

    public func flush(completion: @escaping BlockCompletion) {
        if quiesceCount > 0 { return queued.append { self.flush(completion: completion) } }
        guard let node = begin() else { return completion(Self.noMedium) }
        node.flush(completion: ending(completion))
    }

    public func prefetch(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        if quiesceCount > 0 { return queued.append { self.prefetch(at: offset, length: length, completion: completion) } }
        guard let node = begin() else { return completion(Self.noMedium) }
        node.prefetch(at: offset, length: length, completion: ending(completion))
    }

    /// What a reader sees, through the backing chain (`blockStatusAbove`).
    public func blockStatus(at offset: Int64, length: Int64,
                            completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        if quiesceCount > 0 { return queued.append { self.blockStatus(at: offset, length: length, completion: completion) } }
        guard let node = begin() else { return completion(.failure(Self.noMedium)) }
        node.blockStatusAbove(at: offset, length: length) { result in
            self.end()
            completion(result)
        }
    }

    public func allocationDepth(at offset: Int64, length: Int64,
                                completion: @escaping (Result<(depth: UInt32, length: Int64), BlockError>) -> Void) {
        if quiesceCount > 0 { return queued.append { self.allocationDepth(at: offset, length: length, completion: completion) } }
        guard let node = begin() else { return completion(.failure(Self.noMedium)) }
        node.allocationDepth(at: offset, length: length) { result in
            self.end()
            completion(result)
        }
    }

    // MARK: drained sections

    /// Stops new requests (they queue) and succeeds once none is in flight.
    /// Pair every call with `endDrain()`.
    public func beginDrain() -> EventLoopFuture<Void> {
        graph.eventLoop.assertInEventLoop()
        quiesceCount += 1
        if inFlight == 0 { return graph.eventLoop.makeSucceededFuture(()) }
        let promise = graph.eventLoop.makePromise(of: Void.self)
        drainPromises.append(promise)
        return promise.futureResult
    }

    /// Ends a drained section; queued requests start in arrival order.
    public func endDrain() {
        graph.eventLoop.assertInEventLoop()
        precondition(quiesceCount > 0, "endDrain without beginDrain")
        quiesceCount -= 1
        guard quiesceCount == 0 else { return }
        let work = queued
        queued = []
        work.forEach { $0() }
    }
}
