/// A request a `BlockBackend` counts in flight: the completion to call once
/// the backend has counted it as ended.
///
/// Reused through the backend's `idleRequests` rather than captured with
/// the backend in a fresh closure per request: a closure that captures
/// only this object needs no context of its own, which saves an allocation
/// and its free on every request.
final class BlockBackendRequest {
    /// Set while in flight only, so the idle pool holds no cycle.
    private var backend: BlockBackend?
    private var completion: BlockCompletion?

    func begin(backend: BlockBackend, completion: @escaping BlockCompletion) {
        self.backend = backend
        self.completion = completion
    }

    /// Ends the request, goes back to the pool, then completes: the
    /// completion may start the next request, which may take this object.
    func end(_ error: BlockError?) {
        guard let backend, let completion else {
            return assertionFailure("BlockBackendRequest ended twice, or never began")
        }
        self.backend = nil
        self.completion = nil
        backend.ended(self)
        completion(error)
    }
}
