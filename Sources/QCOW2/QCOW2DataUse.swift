import BlockLayer

/// One data read or in-place write in flight, as `QCOW2IOEpochs` counts
/// it: the epoch it holds and the completion to call once it has ended.
///
/// Reused through the driver's `idleDataUses` rather than captured in a
/// fresh closure per request: a closure that captures only this object
/// needs no context of its own, which saves an allocation and its free on
/// every allocated read and write (callgrind: about a quarter of what
/// qcow2 added to a 4 KiB read).
final class QCOW2DataUse {
    /// Set while in flight only, so the idle pool holds no cycle.
    private var driver: QCOW2Driver?
    private var epoch: UInt64 = 0
    private var completion: BlockCompletion?

    func begin(driver: QCOW2Driver, epoch: UInt64, completion: @escaping BlockCompletion) {
        self.driver = driver
        self.epoch = epoch
        self.completion = completion
    }

    /// Ends the use, goes back to the pool, then completes: the completion
    /// may start the next request, which may take this object again.
    func end(_ error: BlockError?) {
        guard let driver, let completion else {
            return assertionFailure("QCOW2DataUse ended twice, or never began")
        }
        self.driver = nil
        self.completion = nil
        driver.endUse(epoch)
        driver.idleDataUses.append(self)
        completion(error)
    }
}
