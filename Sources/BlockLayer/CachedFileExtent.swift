import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Where the bytes of a guest range sit, whole, in the page cache of one
/// file: what a reader can hand to the kernel (`sendfile`) instead of
/// copying them out and back in.
///
/// A READ of 256 KiB copied from the page cache into a buffer and from the
/// buffer into the socket costs the server ~85 µs of CPU on the benchmark
/// VM; `sendfile` of the same range ~28 µs, the socket taking the cached
/// pages as they are. The client then copies straight out of the page
/// cache: a single-threaded client on the same machine pays for that
/// (fio's nbd engine, 256 KiB reads QD8: 11.1K → 8.9K IOPS), one with a
/// thread per connection gains (nbdcopy: 2,286 → 2,777 MiB/s).
///
/// The data is read when the reply is written, not when the request is
/// answered. A read error then closes the connection, since the reply
/// header has gone out already. A file shrunk under the server by someone
/// else (Strata never shrinks one, and holds QEMU's image locks) would
/// leave NIO retrying a `sendfile` that has nothing to send.
public struct CachedFileExtent {
    /// The file; open as long as the node is, and used only on the graph's
    /// event loop (NIO lets one user at a time have a handle's descriptor).
    public let file: NIOFileHandle
    public let offset: Int64
    public let length: Int
    /// The driver keeping the range's bytes where they are until it has
    /// been sent, if anything could move them meanwhile (a qcow2 image
    /// hands freed clusters to other guest ranges).
    public var holder: (any CachedFileExtentHolder)?

    /// The page cache's unit: residency is counted, and holes punched, in
    /// whole pages.
    public static let pageSize = max(Int(sysconf(Int32(_SC_PAGESIZE))), 4096)

    public init(file: NIOFileHandle, offset: Int64, length: Int) {
        self.file = file
        self.offset = offset
        self.length = length
    }

    /// The region to write to a channel.
    public var region: FileRegion {
        FileRegion(fileHandle: file, readerIndex: Int(offset), endIndex: Int(offset) + length)
    }
}
