import BlockLayer
import NBDProtocol
import NIOCore

/// Running transmission-phase commands against the export's backend.
extension NBDConnectionHandler {
    func handle(_ request: NBDRequest) {
        if let (error, message) = NBDRequestValidation.check(request, session: session) {
            log("request \(request.type) at \(request.offset)+\(request.length) refused: \(message)")
            beginRequest(bytes: 0)
            sendError(cookie: request.cookie, error: error, message: message)
            endRequest(bytes: 0)
            return
        }
        let backend = export.backend
        // Validation bounds offset + length by the export size for every
        // command that uses them; FLUSH and DISC may carry anything.
        let offset = Int64(truncatingIfNeeded: request.offset)
        let length = Int64(request.length)
        switch request.command! {
        case .read:
            read(request)
        case .write:
            guard let payload = request.payload else {
                beginRequest(bytes: 0)
                return complete(request, error: .einval)
            }
            let size = payload.readableBytes
            beginRequest(bytes: size)
            let bytes = payload.withUnsafeReadableBytes { $0 }
            let flags: BlockRequestFlags = request.flags.contains(.fua) ? [.fua] : []
            backend.write(at: offset, from: bytes, flags: flags) { error in
                withExtendedLifetime(payload) {}
                self.complete(request, error: error, bytes: size)
            }
        case .writeZeroes:
            beginRequest(bytes: 0)
            var flags: BlockRequestFlags = []
            if !request.flags.contains(.noHole) { flags.insert(.mayUnmap) }
            if request.flags.contains(.fastZero) { flags.insert(.noFallback) }
            if request.flags.contains(.fua) { flags.insert(.fua) }
            backend.writeZeroes(at: offset, length: length, flags: flags) { error in
                self.complete(request, error: error)
            }
        case .trim:
            beginRequest(bytes: 0)
            backend.discard(at: offset, length: length) { error in
                if error == nil, request.flags.contains(.fua) {
                    backend.flush { self.complete(request, error: $0) }
                } else {
                    self.complete(request, error: error)
                }
            }
        case .flush:
            beginRequest(bytes: 0)
            backend.flush { error in self.complete(request, error: error) }
        case .cache:
            beginRequest(bytes: 0)
            backend.prefetch(at: offset, length: length) { error in self.complete(request, error: error) }
        case .blockStatus:
            blockStatus(request)
        case .disconnect:
            log("client sent NBD_CMD_DISC")
            clientDisconnected()
        }
    }

    /// Replies to a command without payload and ends it.
    private func complete(_ request: NBDRequest, error: BlockError?, bytes: Int = 0) {
        if let error {
            sendError(cookie: request.cookie, error: NBDError(error, for: request), message: error.description)
        } else {
            sendShort { NBDReplyEncoder.writeSimpleReply(error: 0, cookie: request.cookie, into: &$0) }
        }
        endRequest(bytes: bytes)
    }

    /// An error reply: an error chunk once structured replies are on (the
    /// spec asks that for READ and recommends it for the rest).
    func sendError(cookie: UInt64, error: NBDError, message: String) {
        var reply = allocator.buffer(capacity: 32 + message.utf8.count)
        if session.structuredReplies {
            NBDReplyEncoder.writeErrorChunk(error: error, message: message, cookie: cookie, into: &reply)
        } else {
            NBDReplyEncoder.writeSimpleReply(error: error.rawValue, cookie: cookie, into: &reply)
        }
        send(reply)
    }

    /// READ: data straight into the reply buffer (aligned for O_DIRECT);
    /// with structured replies an all-zero result goes out as a hole chunk.
    private func read(_ request: NBDRequest) {
        let length = Int(request.length)
        beginRequest(bytes: length)
        let cookie = request.cookie
        let offset = request.offset
        let structured = session.structuredReplies
        if length == 0 {
            sendShort { reply in
                if structured {
                    NBDReplyEncoder.writeNoneChunk(cookie: cookie, into: &reply)
                } else {
                    NBDReplyEncoder.writeSimpleReply(error: 0, cookie: cookie, into: &reply)
                }
            }
            return endRequest(bytes: length)
        }
        if length >= configuration.smallestCachedSend {
            let backend = export.backend
            if let extent = backend.beginCachedRead(at: Int64(offset), length: length) {
                return sendCached(extent, for: request)
            }
        }
        readIntoBuffer(request)
    }

    /// READ into a reply buffer: the request is counted in flight already.
    private func readIntoBuffer(_ request: NBDRequest) {
        let length = Int(request.length)
        var data = transferBuffer(length: length, headroom: NBDReplyEncoder.dataChunkHeaderSize)
        let base = data.withUnsafeMutableWritableBytes { $0.baseAddress! }
        data.moveWriterIndex(forwardBy: length)
        let target = UnsafeMutableRawBufferPointer(start: base, count: length)
        let pending = idleReads.popLast() ?? NBDPendingRead()
        // Consumed, not copied: the reply writes its header into this
        // storage, which must then have no other owner.
        pending.begin(handler: self, request: request, data: consume data, target: target)
        export.backend.read(at: Int64(request.offset), into: target) { error in pending.end(error) }
    }

    /// The reply to a READ whose data is in `data` (`target` is its bytes).
    func readFinished(cookie: UInt64, offset: UInt64, flags: NBDCommandFlags, data: inout ByteBuffer,
                      target: UnsafeMutableRawBufferPointer, error: BlockError?) {
        let length = target.count
        if let error {
            let request = NBDRequest(type: NBDCommand.read.rawValue, flags: flags, cookie: cookie, offset: offset,
                                     length: UInt32(length))
            sendError(cookie: cookie, error: NBDError(error, for: request), message: error.description)
            return endRequest(bytes: length)
        }
        if session.structuredReplies {
            let bytes = UnsafeRawBufferPointer(target)
            let dontFragment = flags.contains(.dontFragment)
            func chunk(_ start: Int, _ count: Int, hole: Bool, done: Bool) {
                if hole {
                    var header = allocator.buffer(capacity: 32)
                    NBDReplyEncoder.writeHoleChunk(done: done, cookie: cookie, offset: offset + UInt64(start),
                                                   length: UInt32(count), into: &header)
                    send(header)
                } else {
                    func header(_ buffer: inout ByteBuffer) {
                        NBDReplyEncoder.writeDataChunkHeader(done: done, cookie: cookie, offset: offset + UInt64(start),
                                                             dataLength: count, into: &buffer)
                    }
                    if count == length {
                        send(header: NBDReplyEncoder.dataChunkHeaderSize, header, before: &data)
                    } else {
                        var piece = data.getSlice(at: data.readerIndex + start, length: count)!
                        send(header: NBDReplyEncoder.dataChunkHeaderSize, header, before: &piece)
                    }
                }
            }
            if SparseReadPlan.maySplit(count: length, dontFragment: dontFragment) {
                let pieces = SparseReadPlan.pieces(of: bytes, offset: offset, dontFragment: dontFragment)
                for (index, piece) in pieces.enumerated() {
                    chunk(piece.start, piece.length, hole: piece.hole, done: index == pieces.count - 1)
                }
            } else {
                // Most reads are too short to hold a hole worth its own
                // chunk: no plan (and no allocation) for those.
                chunk(0, length, hole: isAllZero(bytes), done: true)
            }
        } else {
            send(header: NBDReplyEncoder.simpleReplyHeaderSize, {
                NBDReplyEncoder.writeSimpleReply(error: 0, cookie: cookie, into: &$0)
            }, before: &data)
        }
        endRequest(bytes: length)
    }

    /// Sends a `size`-byte reply header that `write` writes, then `data`:
    /// as one buffer when `data` has room for the header before it (a
    /// `transferBuffer`'s headroom), else as two. `data` is inout so that
    /// the header goes into its storage without a copy of the whole.
    private func send(header size: Int, _ write: (inout ByteBuffer) -> Void, before data: inout ByteBuffer) {
        if data.prependHeader(size: size, write) { return send(data) }
        var header = allocator.buffer(capacity: size)
        write(&header)
        send(header)
        send(data)
    }

    /// READ of a range the page cache holds whole: the reply header, then
    /// the file range for the kernel to send. The read stays in flight
    /// (for the backend's drains too) until the data has gone out. Its
    /// zeroes, if any, go out as data: no hole chunk without looking.
    private func sendCached(_ extent: CachedFileExtent, for request: NBDRequest) {
        var header = allocator.buffer(capacity: 32)
        if session.structuredReplies {
            NBDReplyEncoder.writeDataChunkHeader(done: true, cookie: request.cookie, offset: request.offset,
                                                 dataLength: extent.length, into: &header)
        } else {
            NBDReplyEncoder.writeSimpleReply(error: 0, cookie: request.cookie, into: &header)
        }
        send(header)
        let backend = export.backend
        send(extent.region) {
            backend.endCachedRead(extent)
            self.endRequest(bytes: extent.length)
        }
    }

    /// An empty buffer with room for `length` bytes of READ or WRITE data
    /// at the export node's optimal memory alignment, so O_DIRECT uses it
    /// as it is and a page-sized transfer is one page for the device.
    /// Transfers too long for scattered pages go to huge-page slabs (one
    /// disk request each, not two), which need only the required alignment:
    /// their chunks start on 4 KiB and lie in huge pages. `headroom`
    /// bytes before the data are kept free for a reply header (see
    /// `ByteBuffer.prependHeader`), except in huge-page slabs. Short
    /// buffers are recycled (see `TransferBuffers.recycles`).
    func transferBuffer(length: Int, headroom: Int = 0) -> ByteBuffer {
        let limits = export.backend.node?.limits ?? BlockLimits()
        if TransferBuffers.suits(length: length, alignment: limits.memoryAlignment) {
            return TransferBuffers.allocator.buffer(capacity: length)
        }
        let alignment = limits.optimalMemoryAlignment
        // Recycled buffers start on a page: the data needs padding only to
        // leave room for the header, and a request costs no malloc.
        let headerRoom = (headroom + alignment - 1) / alignment * alignment
        if TransferBuffers.recycles(capacity: headerRoom + length, alignment: alignment) {
            var data = TransferBuffers.allocator.buffer(capacity: headerRoom + length)
            data.moveWriterIndex(forwardBy: headerRoom)
            data.moveReaderIndex(forwardBy: headerRoom)
            return data
        }
        var data = allocator.buffer(capacity: length + alignment + headroom)
        let base = Int(bitPattern: data.withUnsafeMutableWritableBytes { $0.baseAddress! }) + headroom
        let padding = headroom + (alignment - base % alignment) % alignment
        data.moveWriterIndex(forwardBy: padding)
        data.moveReaderIndex(forwardBy: padding)
        return data
    }

    /// BLOCK_STATUS: one chunk per selected context, the last marked done.
    private func blockStatus(_ request: NBDRequest) {
        beginRequest(bytes: 0)
        let cookie = request.cookie
        let contexts = session.metaContexts
        let one = request.flags.contains(.reqOne)
        var chunks: [(UInt32, [(length: UInt32, flags: UInt32)])] = []
        func next(_ index: Int) {
            guard index < contexts.count else {
                var reply = allocator.buffer(capacity: 64)
                for (position, (id, extents)) in chunks.enumerated() {
                    NBDReplyEncoder.writeBlockStatusChunk(done: position == chunks.count - 1, cookie: cookie,
                                                          contextID: id, extents: extents, into: &reply)
                }
                send(reply)
                return endRequest(bytes: 0)
            }
            let context = contexts[index]
            let kind: ExtentCollector.Kind = context.name == NBDExport.qemuAllocationDepth ? .allocationDepth : .allocation
            ExtentCollector.collect(kind, backend: export.backend, offset: Int64(request.offset),
                                    length: Int64(request.length), maxExtents: one ? 1 : ExtentCollector.maxExtents) { result in
                switch result {
                case .failure(let error):
                    self.sendError(cookie: cookie, error: NBDError(error, for: request), message: error.description)
                    self.endRequest(bytes: 0)
                case .success(let extents):
                    chunks.append((context.id, extents))
                    next(index + 1)
                }
            }
        }
        next(0)
    }
}
