import BlockLayer
import CLinuxAIO
#if canImport(Glibc)
import Glibc
#endif

/// Ranges a reader can `sendfile` (see `CachedFileExtent`).
extension FileDriver {
    private static let pageSize = Int64(CachedFileExtent.pageSize)

    /// Bytes of cached ranges turned down after a miss (see
    /// `cachedFileExtent`): a few readahead windows of a cold stream.
    static let coldStreamLength: Int64 = 64 << 20

    /// Bytes of cached ranges offered between two looks at the readahead
    /// front: a warm stream costs one cachestat per 8 MiB, not one per READ.
    static let frontCheckInterval: Int64 = 8 << 20

    /// The range itself when every page of it is data in the page cache,
    /// read from the disk already, and not just read: `sendfile` runs on the
    /// event loop, and any other range goes the usual way.
    ///
    /// cachestat(2) counts the cached pages, but readahead puts pages in the
    /// cache before the disk has filled them, so the first and the last page
    /// are also read with RWF_NOWAIT (one byte each), which fails for a page
    /// still being read. Pages of a hole read as cached zeroes: a range with
    /// a hole goes the usual way too, to become a hole chunk.
    ///
    /// After a miss, the next `coldStreamLength` bytes of ranges asked for
    /// go the usual way, without a look at the page cache: in a cold stream
    /// they are pages readahead has only just brought in, which no CPU has
    /// touched. Sent with `sendfile`, the client's receive copy is the
    /// first to touch them, and on a VM whose idle memory the host has taken
    /// back (free page reporting) that first touch is what costs: a cold
    /// 2 GiB nbdcopy pass ran at 0.79x qemu-nbd, whose pool threads copy the
    /// data into their own buffers. Read on the pool here, the same pass
    /// keeps up with qemu-nbd (raw 1.02x, qcow2 0.99x; where the memory was
    /// backed 1.13x and 0.93x, as with sendfile). A warm stream has no
    /// misses, so it keeps sending from the cache.
    ///
    /// A cold stream whose readahead keeps ahead of the reader has no misses
    /// either: a backing file read one MiB in two (a chain's base under an
    /// overlay holding the other half) is read ahead twice as fast as it is
    /// asked for. Its readahead's front shows all the same: the page
    /// `coldStreamLength` past the range is not cached yet, which starts a
    /// cold stream as a miss does. Sent from such pages, cold 2 GiB nbdcopy
    /// passes over `run.sh`'s chain ran at 0.90x qemu-nbd (10 pairs, 2 won),
    /// some at half speed. Once the front is found cached, it is looked at
    /// again `frontCheckInterval` bytes later.
    public func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        guard let cacheFile, cacheResidency, length > 0, offset >= 0, offset + Int64(length) <= size else {
            return nil
        }
        // Inside a cold stream's window the answer is no, cached or not:
        // nothing to look up. The first range after it is looked at again.
        if coldStreamBytes > 0 {
            coldStreamBytes -= Int64(length)
            return nil
        }
        let end = offset + Int64(length)
        let cached = strata_cached_pages(fd, offset, Int64(length))
        if cached < 0 {
            if cached == -Int64(ENOSYS) || cached == -Int64(EPERM) { cacheResidency = false }
            return nil
        }
        guard cached >= (end - 1) / Self.pageSize - offset / Self.pageSize + 1,
              isReadable(at: offset), isReadable(at: end - 1) else {
            coldStreamBytes = Self.coldStreamLength
            frontCheckBytes = 0  // once the stream has passed, look at the front at once
            return nil
        }
        if frontCheckBytes > 0 {
            frontCheckBytes -= Int64(length)
        } else {
            let ahead = end + Self.coldStreamLength
            if ahead < size, strata_cached_pages(fd, ahead, 1) == 0 {
                coldStreamBytes = Self.coldStreamLength
                return nil
            }
            frontCheckBytes = Self.frontCheckInterval
        }
        if hasHole(from: offset, to: end) { return nil }
        return CachedFileExtent(file: cacheFile, offset: offset, length: length)
    }

    /// Whether `[offset, end)` holds a hole. Only a file with fewer blocks
    /// than bytes is asked: SEEK_HOLE takes the inode lock, which a
    /// throttled writer may hold.
    private func hasHole(from offset: Int64, to end: Int64) -> Bool {
        !isBlockDevice && strata_fd_allocated_bytes(fd) < size && strata_seek_hole(fd, offset) < end
    }

    /// Whether the byte at `offset` reads without waiting for the disk.
    private func isReadable(at offset: Int64) -> Bool {
        var byte: UInt8 = 0
        return strata_pread(fd, &byte, 1, offset, strata_RWF_NOWAIT) == 1
    }
}
