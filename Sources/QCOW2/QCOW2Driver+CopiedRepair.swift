import BlockLayer
import NIOCore

extension QCOW2Driver {
    /// The rest of `qemu-img check -r all` after refcounts are repaired: sets
    /// or clears every COPIED flag of the active tables that disagrees with
    /// its cluster's refcount. Returns how many entries were rewritten.
    public func repairCopiedFlags(file: BlockNode) -> EventLoopFuture<Int> {
        QCOW2Checker(driver: self, file: file).run().flatMap { report in
            var chain = file.eventLoop.makeSucceededVoidFuture()
            for fix in report.copiedFixes {
                chain = chain.flatMap { self.rewrite(fix, file: file) }
            }
            return chain.map { report.copiedFixes.count }
        }
    }

    /// Writes one entry in place and updates the copy held in memory.
    private func rewrite(_ fix: QCOW2Checker.CopiedFix, file: BlockNode) -> EventLoopFuture<Void> {
        guard let buffer = AlignedBuffer.allocate(count: 8, alignment: 4096) else {
            return file.eventLoop.makeFailedFuture(BlockError.enomem)
        }
        buffer.pointer.storeBytes(of: fix.entry.bigEndian, as: UInt64.self)
        let promise = file.eventLoop.makePromise(of: Void.self)
        file.write(at: Int64(fix.entryOffset), from: buffer.bytes, flags: .fua) { error in
            buffer.deallocate()
            if let error { return promise.fail(error) }
            if let index = fix.l1Index {
                if index < self.l1.count { self.l1[index] = fix.entry }
            } else if let offset = fix.l2Table {
                for table in [self.dirtyL2[offset], self.l2Cache.get(offset)].compactMap({ $0 }) {
                    table.setEntry(fix.slot, fix.entry)
                }
            }
            promise.succeed(())
        }
        return promise.futureResult
    }
}
