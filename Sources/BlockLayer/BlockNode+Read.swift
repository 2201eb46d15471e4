/// Reads, prefetch and block status: the read side of the request path.
extension BlockNode {
    /// Reads `buffer.count` bytes at `offset`. Requests below the node's
    /// alignment are padded through an aligned bounce buffer.
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: BlockRequestFlags = [], completion: @escaping BlockCompletion) {
        let length = buffer.count
        guard contains(offset: offset, length: Int64(length)) else { return completion(.einval) }
        guard length > 0 else { return completion(nil) }
        let align = limits.requestAlignment
        let memoryAligned = Int(bitPattern: buffer.baseAddress) % limits.memoryAlignment == 0
        if offset % Int64(align) == 0, length % align == 0, memoryAligned {
            driver.read(at: offset, into: buffer, flags: flags, completion: completion)
            return
        }
        let start = alignDown(offset, align)
        let end = alignUp(offset + Int64(length), align)
        guard let bounce = graph.bufferPool.take(count: Int(end - start),
                                                  alignment: max(limits.memoryAlignment, align)) else {
            return completion(.enomem)
        }
        driver.read(at: start, into: bounce.mutableBytes, flags: flags) { error in
            if error == nil {
                buffer.baseAddress!.copyMemory(from: bounce.pointer + Int(offset - start), byteCount: length)
            }
            self.graph.bufferPool.give(bounce)
            completion(error)
        }
    }

    /// The file range to send for a read of `[offset, offset + length)`,
    /// if the driver has all of it as plain data in the page cache (see
    /// `CachedFileExtent`). Sending it is a read like any other: no
    /// alignment applies, since nothing is read with O_DIRECT.
    public func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        guard length > 0, contains(offset: offset, length: Int64(length)) else { return nil }
        return driver.cachedFileExtent(at: offset, length: length)
    }

    /// NBD_CMD_CACHE: asks the driver to warm a range.
    public func prefetch(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        guard contains(offset: offset, length: length) else { return completion(.einval) }
        guard length > 0 else { return completion(nil) }
        driver.prefetch(at: offset, length: length, completion: completion)
    }

    /// The allocation state from `offset`, covering at most `length` bytes.
    public func blockStatus(at offset: Int64, length: Int64,
                            completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        guard offset >= 0, length > 0, offset < self.length else { return completion(.failure(.einval)) }
        let length = min(length, self.length - offset)
        driver.blockStatus(at: offset, length: length) { result in
            switch result {
            case .success(var status):
                // Guard against drivers that overshoot or report nothing.
                status.length = max(1, min(status.length, length))
                completion(.success(status))
            case .failure(let error):
                completion(.failure(error))
            }
        }
    }

    /// The status of what a reader of this node sees, through the backing
    /// chain: where this node has nothing, what its backing file has;
    /// past the backing file's end, or without one, zeroes (QEMU's
    /// block_status_above). `.allocated` still says whether this node
    /// itself holds the range.
    public func blockStatusAbove(at offset: Int64, length: Int64,
                                 completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        blockStatus(at: offset, length: length) { result in
            guard case .success(var status) = result, !status.flags.contains(.allocated) else {
                return completion(result)
            }
            guard let backing = self.backing?.node, offset < backing.length else {
                status.flags.insert(.zero)
                return completion(.success(status))
            }
            let below = min(status.length, backing.length - offset)
            backing.blockStatusAbove(at: offset, length: below) { inner in
                completion(inner.map { innerStatus in
                    var status = innerStatus
                    status.flags.remove(.allocated)
                    return status
                })
            }
        }
    }

    /// How deep in the backing chain `offset` is allocated: 1 for this node,
    /// 2 for its backing file and so on, 0 if nowhere
    /// (`qemu:allocation-depth`). Returns the depth and the length it holds for.
    public func allocationDepth(at offset: Int64, length: Int64,
                                completion: @escaping (Result<(depth: UInt32, length: Int64), BlockError>) -> Void) {
        blockStatus(at: offset, length: length) { result in
            switch result {
            case .failure(let error):
                completion(.failure(error))
            case .success(let status):
                if status.flags.contains(.allocated) {
                    return completion(.success((1, status.length)))
                }
                guard let backing = self.backing?.node, offset < backing.length else {
                    return completion(.success((0, status.length)))
                }
                let below = min(status.length, backing.length - offset)
                backing.allocationDepth(at: offset, length: below) { inner in
                    completion(inner.map { ($0.depth == 0 ? 0 : $0.depth + 1, $0.length) })
                }
            }
        }
    }
}
