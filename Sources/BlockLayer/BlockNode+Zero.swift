import NIOCore

/// Write-zeroes and discard.
extension BlockNode {
    /// Largest zero buffer written at once when a driver cannot zero natively.
    static let zeroFallbackChunk = 1 << 20

    /// Makes `[offset, offset + length)` read as zeroes. With `.mayUnmap`
    /// (and discard=unmap on this node) space may be freed; with
    /// `.noFallback` the request fails with ENOTSUP rather than write data.
    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                            completion: @escaping BlockCompletion) {
        guard !options.readOnly else { return completion(.eperm) }
        guard contains(offset: offset, length: length) else { return completion(.einval) }
        guard length > 0 else { return completion(nil) }
        var flags = flags
        if options.discard != .unmap { flags.remove(.mayUnmap) }

        let align = Int64(max(limits.requestAlignment, limits.zeroAlignment, 1))
        let end = offset + length
        let headEnd = min(alignUp(offset, Int(align)), end)
        let tailStart = max(alignDown(end, Int(align)), headEnd)
        let hasHead = headEnd > offset
        let hasTail = end > tailStart
        // An edge narrower than the zero alignment goes to a driver that
        // takes such pieces (whatever the request alignment, as QEMU's
        // qcow2 keeps its own); otherwise it can only be zeroed by writing
        // data.
        let edgesToDriver = driver.zeroesPartialUnits
        if hasHead || hasTail, !edgesToDriver, flags.contains(.noFallback) {
            return completion(.enotsup)
        }
        let fua = flags.contains(.fua)
        let pieceFlags = flags.subtracting(.fua)
        let finish: BlockCompletion = { error in
            if error == nil, fua { self.flush(completion: completion) } else { completion(error) }
        }
        let zeroEdge = { (start: Int64, count: Int64, done: @escaping BlockCompletion) in
            if edgesToDriver { return self.zeroAligned(at: start, length: count, flags: pieceFlags, completion: done) }
            self.zeroByWriting(at: start, length: count, completion: done)
        }
        let tail = {
            guard hasTail else { return finish(nil) }
            zeroEdge(tailStart, end - tailStart, finish)
        }
        let middle = {
            guard tailStart > headEnd else { return tail() }
            self.zeroAligned(at: headEnd, length: tailStart - headEnd, flags: pieceFlags) { error in
                if let error { return finish(error) }
                tail()
            }
        }
        guard hasHead else { return middle() }
        zeroEdge(offset, headEnd - offset) { error in
            if let error { return finish(error) }
            middle()
        }
    }

    /// Zeroes a sub-alignment piece by writing zeroes (read-modify-write).
    private func zeroByWriting(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        guard let zeroes = graph.bufferPool.takeZeroed(count: Int(length), alignment: limits.memoryAlignment) else {
            return completion(.enomem)
        }
        writeWithoutDetection(at: offset, from: zeroes.bytes, flags: []) { error in
            self.graph.bufferPool.give(zeroes)
            completion(error)
        }
    }

    /// Zeroes a range through the driver: an aligned one, or an edge a
    /// driver that takes such pieces is offered. Where the driver cannot,
    /// zeroes are written, padded by read-modify-write if the range is off
    /// the request alignment, unless the request must not fall back.
    private func zeroAligned(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                             completion: @escaping BlockCompletion) {
        track(start: offset, end: offset + length, serialising: false) { id in
            let driverFlags = flags.intersection(self.driver.supportedZeroFlags.union(.noFallback))
            self.driver.writeZeroes(at: offset, length: length, flags: driverFlags) { error in
                guard let error, error.isNotSupported, !flags.contains(.noFallback) else {
                    self.finishWrite(id)
                    return completion(error)
                }
                let request = Int64(max(self.limits.requestAlignment, 1))
                if offset % request != 0 || length % request != 0 {
                    // Only an edge, narrower than the zero alignment.
                    self.finishWrite(id)
                    return self.zeroByWriting(at: offset, length: length, completion: completion)
                }
                self.writeZeroBuffers(id, at: offset, length: length, completion: completion)
            }
        }
    }

    /// The fallback: zero buffers, a chunk at a time, one loop tick apart so
    /// a huge range never deepens the stack.
    private func writeZeroBuffers(_ id: UInt64, at offset: Int64, length: Int64,
                                  completion: @escaping BlockCompletion) {
        let chunk = Int(min(length, Int64(Self.zeroFallbackChunk)))
        guard let zeroes = graph.bufferPool.takeZeroed(count: chunk, alignment: limits.memoryAlignment) else {
            finishWrite(id)
            return completion(.enomem)
        }
        var position = offset
        let end = offset + length
        func step() {
            let count = Int(min(Int64(chunk), end - position))
            let piece = UnsafeRawBufferPointer(start: zeroes.pointer, count: count)
            driver.write(at: position, from: piece, flags: []) { error in
                position += Int64(count)
                if error != nil || position >= end {
                    self.graph.bufferPool.give(zeroes)
                    self.finishWrite(id)
                    return completion(error)
                }
                self.eventLoop.execute { step() }
            }
        }
        step()
    }

    /// Frees `[offset, offset + length)` when the node was opened with
    /// discard=unmap; otherwise (and where the driver cannot) does nothing.
    /// `evenIfIgnored` frees it whatever the discard option says: for a
    /// format's own freed clusters, whose pages must leave the page cache
    /// before the clusters are used again.
    public func discard(at offset: Int64, length: Int64, evenIfIgnored: Bool = false,
                        completion: @escaping BlockCompletion) {
        guard !options.readOnly else { return completion(.eperm) }
        guard contains(offset: offset, length: length) else { return completion(.einval) }
        guard evenIfIgnored || options.discard == .unmap, length > 0 else { return completion(nil) }
        let align = max(limits.requestAlignment, limits.discardAlignment)
        let start = alignUp(offset, align)
        let end = alignDown(offset + length, align)
        guard start < end else { return completion(nil) }
        track(start: start, end: end, serialising: false) { id in
            self.driver.discard(at: start, length: end - start) { error in
                self.finishWrite(id)
                completion(error.flatMap { $0.isNotSupported ? nil : $0 })
            }
        }
    }
}
