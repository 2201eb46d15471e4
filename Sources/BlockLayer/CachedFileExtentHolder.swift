/// A driver that lends out a `CachedFileExtent` of its file and keeps the
/// bytes there until the extent has been sent.
///
/// The kernel reads the range when the reply goes out, which can be long
/// after the request was answered: a client that stops reading leaves it
/// queued. A qcow2 image may meanwhile free the clusters under it (a
/// discard of the same guest range) and hand them to another guest range,
/// whose data would then go out in this reply. So it holds them until
/// `release` is called.
public protocol CachedFileExtentHolder: AnyObject {
    /// Called once per extent, on the graph's event loop, when it has been
    /// sent (or the send failed).
    func release(_ extent: CachedFileExtent)
}
