/// Writes: alignment padding with read-modify-write, detect-zeroes and FUA.
extension BlockNode {
    /// Writes `buffer` at `offset`. Unaligned requests become a serialising
    /// read-modify-write; FUA the driver lacks becomes a flush.
    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                      flags: BlockRequestFlags = [], completion: @escaping BlockCompletion) {
        guard !options.readOnly else { return completion(.eperm) }
        guard contains(offset: offset, length: Int64(buffer.count)) || mayGrow(offset: offset, length: Int64(buffer.count)) else {
            return completion(.einval)
        }
        guard buffer.count > 0 else { return completion(nil) }
        if options.detectZeroes != .off, !flags.contains(.writeUnchanged), isAllZero(buffer) {
            var zeroFlags = flags.intersection(.fua)
            if options.detectZeroes == .unmap { zeroFlags.insert(.mayUnmap) }
            writeZeroes(at: offset, length: Int64(buffer.count), flags: zeroFlags, completion: completion)
            return
        }
        writeWithoutDetection(at: offset, from: buffer, flags: flags, completion: completion)
    }

    /// Writes past the end are allowed to a user holding RESIZE (a format
    /// growing its file, as in QEMU); the node grows with them.
    func mayGrow(offset: Int64, length: Int64) -> Bool {
        perm.contains(.resize) && offset >= 0 && length >= 0 && offset <= Int64.max - length
    }

    func writeWithoutDetection(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                               flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        let length = buffer.count
        let align = limits.requestAlignment
        let end = offset + Int64(length)
        guard offset % Int64(align) == 0, length % align == 0 else {
            return writePadded(at: offset, from: buffer, flags: flags, completion: completion)
        }
        if Int(bitPattern: buffer.baseAddress) % limits.optimalMemoryAlignment != 0 {
            // Aligned offsets, memory short of the optimal alignment (O_DIRECT):
            // copy, no RMW needed. A short WRITE's payload is a slice of the
            // inbound bytes; one that is merely 512-aligned would reach the
            // device as two segments, which costs more than copying 4 KiB.
            guard let bounce = graph.bufferPool.take(count: length, alignment: limits.optimalMemoryAlignment) else {
                return completion(.enomem)
            }
            bounce.pointer.copyMemory(from: buffer.baseAddress!, byteCount: length)
            track(start: offset, end: end, serialising: false) { id in
                self.writeTracked(id, at: offset, from: bounce.bytes, flags: flags) { error in
                    self.graph.bufferPool.give(bounce)
                    completion(error)
                }
            }
            return
        }
        // The common case, inline: no waiter closure is built unless needed.
        if let id = tracked.tryBegin(start: offset, end: end, serialising: false) {
            return writeTracked(id, at: offset, from: buffer, flags: flags, completion: completion)
        }
        tracked.wait(start: offset, end: end, serialising: false) { id in
            self.writeTracked(id, at: offset, from: buffer, flags: flags, completion: completion)
        }
    }

    /// Issues an aligned write that already holds tracked request `id`.
    func writeTracked(_ id: UInt64, at offset: Int64, from buffer: UnsafeRawBufferPointer,
                      flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        let nativeFUA = driver.supportedWriteFlags.contains(.fua)
        let driverFlags = nativeFUA ? flags : flags.subtracting(.fua)
        driver.write(at: offset, from: buffer, flags: driverFlags) { error in
            self.finishWrite(id)
            if error == nil, flags.contains(.fua), !nativeFUA {
                self.flush(completion: completion)
            } else {
                completion(error)
            }
        }
    }

    /// Read-modify-write of the aligned blocks around an unaligned write,
    /// serialised against every overlapping write so none is torn.
    private func writePadded(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                             flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        let align = limits.requestAlignment
        let length = buffer.count
        let start = alignDown(offset, align)
        let end = alignUp(offset + Int64(length), align)
        guard let bounce = graph.bufferPool.take(count: Int(end - start),
                                                  alignment: max(limits.memoryAlignment, align)) else {
            return completion(.enomem)
        }
        let finish: BlockCompletion = { error in
            self.graph.bufferPool.give(bounce)
            completion(error)
        }
        track(start: start, end: end, serialising: true) { id in
            let headNeeded = offset != start
            let tailStart = end - Int64(align)
            let tailNeeded = offset + Int64(length) != end && !(headNeeded && tailStart == start)
            let merge = {
                (bounce.pointer + Int(offset - start)).copyMemory(from: buffer.baseAddress!, byteCount: length)
                self.writeTracked(id, at: start, from: bounce.bytes, flags: flags, completion: finish)
            }
            let readTail = {
                guard tailNeeded else { return merge() }
                let tail = UnsafeMutableRawBufferPointer(start: bounce.pointer + Int(tailStart - start), count: align)
                self.driver.read(at: tailStart, into: tail, flags: []) { error in
                    if let error {
                        self.finishWrite(id)
                        return finish(error)
                    }
                    merge()
                }
            }
            guard headNeeded else { return readTail() }
            let head = UnsafeMutableRawBufferPointer(start: bounce.pointer, count: align)
            self.driver.read(at: start, into: head, flags: []) { error in
                if let error {
                    self.finishWrite(id)
                    return finish(error)
                }
                readTail()
            }
        }
    }
}
