import BlockLayer

/// A read or write a `FileDriver` has handed to its AIO engine: where it
/// continues once the engine reports the result (a short transfer goes on
/// from where it stopped).
///
/// Reused through the driver's `idleRequests` rather than captured with
/// the driver, the range and the completion in a fresh closure per I/O: a
/// closure that captures only this object needs no context of its own,
/// which saves an allocation and its free on every engine I/O.
final class FileRequest {
    /// Set while in flight only, so the idle pool holds no cycle.
    private var driver: FileDriver?
    private var completion: BlockCompletion?
    private var isWrite = false
    private var fua = false
    private var offset: Int64 = 0
    private var pointer: UnsafeMutableRawPointer?
    private var count = 0

    func begin(driver: FileDriver, isWrite: Bool, fua: Bool, offset: Int64, pointer: UnsafeMutableRawPointer,
               count: Int, completion: @escaping BlockCompletion) {
        self.driver = driver
        self.isWrite = isWrite
        self.fua = fua
        self.offset = offset
        self.pointer = pointer
        self.count = count
        self.completion = completion
    }

    /// Goes back to the pool, then lets the driver handle the result: that
    /// may start the next I/O (the rest of a short one), which may take
    /// this object again.
    func end(_ result: Int) {
        guard let driver, let completion, let pointer else {
            return assertionFailure("FileRequest ended twice, or never began")
        }
        self.driver = nil
        self.completion = nil
        self.pointer = nil
        driver.idleRequests.append(self)
        if isWrite {
            driver.writeDone(result, at: offset, from: pointer, count: count, fua: fua, completion: completion)
        } else {
            driver.readDone(result, at: offset, into: pointer, count: count, completion: completion)
        }
    }
}
