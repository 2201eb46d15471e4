import BlockLayer
import CLinuxAIO
#if canImport(Glibc)
import Glibc
#endif

/// Ranges a reader can `sendfile` (see `CachedFileExtent`).
extension FileDriver {
    private static let pageSize = Int64(CachedFileExtent.pageSize)

    /// The range itself when every page of it is data in the page cache,
    /// read from the disk already: `sendfile` runs on the event loop, and a
    /// range it would have to wait for goes the usual way.
    ///
    /// cachestat(2) counts the cached pages, but readahead puts pages in the
    /// cache before the disk has filled them, so the first and the last page
    /// are also read with RWF_NOWAIT (one byte each), which fails for a page
    /// still being read. Pages of a hole read as cached zeroes: a range with
    /// a hole goes the usual way too, to become a hole chunk.
    public func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        guard let cacheFile, cacheResidency, length > 0, offset >= 0, offset + Int64(length) <= size else {
            return nil
        }
        let end = offset + Int64(length)
        // Asked again by the fill's own completion: every page was read in
        // by then, and no hole was found.
        if let filled = justFilled, filled.offset == offset, filled.length == length {
            return CachedFileExtent(file: cacheFile, offset: offset, length: length)
        }
        let cached = strata_cached_pages(fd, offset, Int64(length))
        if cached < 0 {
            if cached == -Int64(ENOSYS) || cached == -Int64(EPERM) { cacheResidency = false }
            return nil
        }
        guard cached >= (end - 1) / Self.pageSize - offset / Self.pageSize + 1,
              isReadable(at: offset), isReadable(at: end - 1) else {
            return nil
        }
        if hasHole(from: offset, to: end) { return nil }
        return CachedFileExtent(file: cacheFile, offset: offset, length: length)
    }

    /// Whether `fillPageCache` can work here: the file is read through the
    /// page cache with `aio=threads` (where a miss is otherwise copied on a
    /// pool thread; the engines are left as they are), and the kernel says
    /// what the cache holds.
    public var fillsPageCache: Bool {
        engine == nil && cacheFile != nil && cacheResidency && pageCacheFills && PageCacheFiller.shared != nil
    }

    /// Reads a range into the page cache on a pool thread without copying
    /// it out (see `PageCacheFiller`), so that `cachedFileExtent` answers
    /// for it next; true once all of it is in. A range with a hole is left
    /// alone, since `cachedFileExtent` refuses it anyway; the pool thread
    /// looks, as SEEK_HOLE may wait for the inode lock.
    public func fillPageCache(at offset: Int64, length: Int, completion: @escaping (Bool) -> Void) {
        let end = offset + Int64(length)
        guard fillsPageCache, let filler = PageCacheFiller.shared, length > 0, offset >= 0, end <= size else {
            return completion(false)
        }
        let (fd, size, mayHaveHoles) = (self.fd, self.size, !isBlockDevice)
        io.runBlocking({
            if mayHaveHoles, Self.hasHole(fd: fd, size: size, from: offset, to: end) { return 0 }
            return filler.fill(fd: fd, offset: offset, length: length)
        }) { result in
            guard result == length else {
                if result == -Int(EINVAL) { self.pageCacheFills = false }  // no splice for this file
                return completion(false)
            }
            self.justFilled = (offset, length)
            completion(true)
            self.justFilled = nil
        }
    }

    /// Whether `[offset, end)` holds a hole. Only a file with fewer blocks
    /// than bytes is asked: SEEK_HOLE takes the inode lock, which a
    /// throttled writer may hold.
    private func hasHole(from offset: Int64, to end: Int64) -> Bool {
        !isBlockDevice && Self.hasHole(fd: fd, size: size, from: offset, to: end)
    }

    private static func hasHole(fd: Int32, size: Int64, from offset: Int64, to end: Int64) -> Bool {
        strata_fd_allocated_bytes(fd) < size && strata_seek_hole(fd, offset) < end
    }

    /// Whether the byte at `offset` reads without waiting for the disk.
    private func isReadable(at offset: Int64) -> Bool {
        var byte: UInt8 = 0
        return strata_pread(fd, &byte, 1, offset, strata_RWF_NOWAIT) == 1
    }
}
