import BlockLayer
import NBDProtocol
import NIOCore

/// A READ whose data the backend is filling: what its reply needs once the
/// data is in.
///
/// Each connection reuses these (`NBDConnectionHandler.idleReads`) rather
/// than capturing the request, its buffer and the handler in a fresh
/// closure: a closure that captures only this object needs no context of
/// its own, and the buffer needs no box, which saves two allocations and
/// their frees on every READ. As many exist as READs were ever in flight
/// at once on the connection.
final class NBDPendingRead {
    /// Set while in flight only, so the idle pool holds no cycle.
    private var handler: NBDConnectionHandler?
    /// The request's fields the reply needs (not the request itself, whose
    /// optional payload costs a copy in and out).
    private var cookie: UInt64 = 0
    private var offset: UInt64 = 0
    private var flags: NBDCommandFlags = []
    private var data: ByteBuffer?
    private var target = UnsafeMutableRawBufferPointer(start: nil, count: 0)

    func begin(handler: NBDConnectionHandler, request: NBDRequest, data: ByteBuffer,
               target: UnsafeMutableRawBufferPointer) {
        self.handler = handler
        cookie = request.cookie
        offset = request.offset
        flags = request.flags
        self.data = data
        self.target = target
    }

    /// Goes back to the pool, then has the handler reply: the reply may
    /// let the next READ in, which may take this object again. The buffer
    /// leaves this object first, so the header goes into it without a copy.
    func end(_ error: BlockError?) {
        guard let handler, var data = data.take() else {
            return assertionFailure("NBDPendingRead ended twice, or never began")
        }
        self.handler = nil
        handler.idleReads.append(self)
        handler.readFinished(cookie: cookie, offset: offset, flags: flags, data: &data, target: target, error: error)
    }
}
