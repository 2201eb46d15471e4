/// Something that counts requests in flight with reused `InFlightRequest`
/// records: a `BlockBackend` (for drains), a qcow2 driver (for clusters a
/// discard frees while I/O on them is in flight).
public protocol InFlightRequestOwner: AnyObject {
    /// The request counted with `tag` has ended: settle the count and take
    /// `request` back for reuse. Runs before the request's completion.
    func inFlightRequestEnded(_ request: InFlightRequest, tag: UInt64)
}

/// A request its owner counts in flight: the completion to call once the
/// owner has counted it as ended.
///
/// Reused through the owner rather than captured with it in a fresh closure
/// per request: a closure that captures only this object needs no context
/// of its own, which saves an allocation and its free on every request.
public final class InFlightRequest {
    /// Set while in flight only, so the owner's idle pool holds no cycle.
    private var owner: (any InFlightRequestOwner)?
    private var tag: UInt64 = 0
    private var completion: BlockCompletion?

    public init() {}

    public func begin(owner: any InFlightRequestOwner, tag: UInt64 = 0, completion: @escaping BlockCompletion) {
        self.owner = owner
        self.tag = tag
        self.completion = completion
    }

    /// Ends the request with its owner, then completes: the completion may
    /// start the next request, which may take this object again.
    public func end(_ error: BlockError?) {
        guard let owner, let completion else {
            return assertionFailure("InFlightRequest ended twice, or never began")
        }
        self.owner = nil
        self.completion = nil
        owner.inFlightRequestEnded(self, tag: tag)
        completion(error)
    }
}
