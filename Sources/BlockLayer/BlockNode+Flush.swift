/// Flush with coalescing by write generation (QEMU's write_gen).
extension BlockNode {
    /// Counts a change the driver began outside any write request (qcow2
    /// marking the image corrupt when a read met bad metadata) as a write,
    /// so that the next flush reaches the driver instead of being skipped.
    public func noteChangeOutsideRequests() {
        writeGeneration &+= 1
    }

    /// Makes every write completed before this call stable. Flushes that
    /// arrive while one runs wait for it, and skip the disk entirely when
    /// no write completed since the flush they waited for began.
    public func flush(completion: @escaping BlockCompletion) {
        if options.ignoreFlush { return completion(nil) }
        let generation = writeGeneration
        if flushedGeneration == generation, !flushInFlight { return completion(nil) }
        if flushInFlight {
            flushWaiters.append(completion)
            return
        }
        flushInFlight = true
        driver.flush { error in
            self.flushInFlight = false
            if error == nil { self.flushedGeneration = generation }
            let waiters = self.flushWaiters
            self.flushWaiters = []
            completion(error)
            // Waiters arrived during that flush: one more flush covers them
            // all unless nothing was written since it began.
            for waiter in waiters { self.flush(completion: waiter) }
        }
    }
}
