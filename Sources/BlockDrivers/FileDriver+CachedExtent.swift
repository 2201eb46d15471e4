import BlockLayer
import CLinuxAIO
#if canImport(Glibc)
import Glibc
#endif

/// Ranges a reader can `sendfile` (see `CachedFileExtent`).
extension FileDriver {
    private static let pageSize = Int64(max(sysconf(Int32(_SC_PAGESIZE)), 4096))

    /// The range itself when every page of it is data in the page cache,
    /// asked of cachestat(2): a range the kernel would have to read from
    /// the disk goes the usual way, since `sendfile` on the event loop would
    /// block it.
    public func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        guard let cacheFile, cacheResidency, length > 0, offset >= 0, offset + Int64(length) <= size else {
            return nil
        }
        let cached = strata_cached_pages(fd, offset, Int64(length))
        if cached < 0 {
            if cached == -Int64(ENOSYS) || cached == -Int64(EPERM) { cacheResidency = false }
            return nil
        }
        let pages = (offset + Int64(length) - 1) / Self.pageSize - offset / Self.pageSize + 1
        guard cached >= pages else { return nil }
        // A hole read (cached zero pages) goes the usual way too, where
        // its zeroes become a hole chunk instead of data on the wire.
        let hole = strata_seek_hole(fd, offset)
        guard hole >= offset + Int64(length) || (hole < 0 && isBlockDevice) else { return nil }
        return CachedFileExtent(file: cacheFile, offset: offset, length: length)
    }
}
