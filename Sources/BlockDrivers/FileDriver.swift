import BlockLayer
import CLinuxAIO
import NIOCore
import NIOPosix
#if canImport(Glibc)
import Glibc
#endif

/// The `file` protocol driver: a regular file or block device, read and
/// written with Linux AIO (`aio=native`, O_DIRECT), io_uring
/// (`aio=io_uring`) or a thread pool (`aio=threads`), with QEMU's image locks.
///
/// With `aio=threads` and the page cache in use, reads first try
/// `preadv2(RWF_NOWAIT)` on the loop: a cached read completes at once with
/// no thread hop. A miss goes to the loop's io_uring where the kernel
/// allows one, as do O_DIRECT reads and writes: no thread hop either.
/// Measured on the benchmark VM against the pool, 4 KiB random, cold:
/// reads QD1 5.4–6.2K → 6.3–7.1K IOPS, QD32 27–34K → 40–50K at half the
/// CPU per request; `--cache=none` writes QD32 48–52K → 64–67K. Where the
/// kernel refuses io_uring, those go to the pool. Writes try RWF_NOWAIT too
/// where the kernel supports it for buffered writes; where it does not
/// (ext4 on 6.x), a buffered write, a copy into the page cache, is done on
/// the loop unless the last one blocked for long (dirty-page throttling),
/// which sends writes to the pool for a while. A server's large READs of
/// data the page cache has held for a while are sent from it
/// (`cachedFileExtent`) rather than read here.
///
/// Cold sequential reads rely on the kernel's readahead alone. Readahead of
/// our own, `POSIX_FADV_WILLNEED` kept 32 MiB ahead of a run of reads 8 MiB
/// at a time, was tried and dropped: a lone reader of a cold file gains
/// 25–35 % from it, but cold 2 GiB nbdcopy passes through the server lost
/// (qcow2 445–542 MiB/s against 487–597, raw 485–538 against 510–669):
/// the disk had 5.5–7.7 requests in flight instead of 2.6–2.9, each
/// slower, for no more bytes a second.
public final class FileDriver: BlockDriver {
    public let formatName = "file"
    public let options: FileDriverOptions
    public let isBlockDevice: Bool
    let fd: Int32
    let io: FileIOContext
    /// Linux AIO or io_uring; nil with `aio=threads`.
    let engine: FileIOEngine?
    /// With `aio=threads`: the io_uring for I/O that would otherwise wait on
    /// a pool thread: small reads the page cache misses, and O_DIRECT reads
    /// and writes. Nil where the kernel refuses io_uring: then the pool.
    let threadsRing: IOURingEngine?
    /// The file's size in bytes (`length` rounds it up to sectors).
    private(set) var size: Int64
    let offsetAlignment: Int
    let memoryAlignment: Int
    /// Cleared the first time the kernel says RWF_NOWAIT is not supported.
    var nowaitReads: Bool
    var nowaitWrites: Bool
    /// Inline buffered writes are allowed again from this time on.
    var inlineWritesResume = NIODeadline.uptimeNanoseconds(0)
    var locks: ImageLocks?
    /// The file for `sendfile` of cached ranges (a duplicate of `fd`, which
    /// NIO's `FileRegion` needs as a handle); nil with O_DIRECT, where the
    /// page cache is not used.
    let cacheFile: NIOFileHandle?
    /// Cleared the first time the kernel has no cachestat(2).
    var cacheResidency = true
    /// Bytes of ranges `cachedFileExtent` still turns down, without looking,
    /// after a miss or an uncached readahead front: pages the disk has only
    /// just filled (see there).
    var coldStreamBytes: Int64 = 0
    /// Bytes of cached ranges still offered before `cachedFileExtent` looks
    /// at the readahead front again (see there).
    var frontCheckBytes: Int64 = 0
    /// Once fdatasync fails, the kernel forgets the error and may have
    /// dropped the dirty pages: every later flush fails too, with the same
    /// error, so no client is told that lost data is safe. (As in QEMU; not
    /// with O_DIRECT, where no dirty pages were lost.)
    var flushFailure: BlockError?
    /// Engine I/O records that have ended, for the next I/O to take.
    var idleRequests: [FileRequest] = []

    /// Cached reads larger than this still go to the pool: copying them on
    /// the loop would leave the other cores idle while it copies.
    static let largestInlineRead = 128 << 10

    /// An inline write slower than this means the kernel is throttling.
    static let slowInlineWrite = TimeAmount.milliseconds(1)
    /// How long writes go to the pool after a slow inline one.
    static let inlineWriteBackoff = TimeAmount.milliseconds(50)

    init(options: FileDriverOptions, fd: Int32, io: FileIOContext, engine: FileIOEngine?, threadsRing: IOURingEngine? = nil,
         isBlockDevice: Bool, size: Int64, offsetAlignment: Int, memoryAlignment: Int) {
        self.options = options
        self.fd = fd
        self.io = io
        self.engine = engine
        self.threadsRing = threadsRing
        self.isBlockDevice = isBlockDevice
        self.size = size
        self.offsetAlignment = offsetAlignment
        self.memoryAlignment = memoryAlignment
        nowaitReads = !options.direct
        nowaitWrites = !options.direct
        if options.locking != .off {
            locks = ImageLocks(fd: fd, filename: options.filename)
        }
        let copy = options.direct ? -1 : fcntl(fd, F_DUPFD_CLOEXEC, 0)
        cacheFile = copy >= 0 ? NIOFileHandle(_deprecatedTakingOwnershipOfDescriptor: copy) : nil
    }

    /// Opens a file node; fails with QEMU's messages for missing files,
    /// bad modes and `aio=native` without O_DIRECT.
    public static func open(_ options: FileDriverOptions, io: FileIOContext) -> EventLoopFuture<FileDriver> {
        let loop = io.eventLoop
        if options.aio == .native, !options.direct {
            return loop.makeFailedFuture(BlockError(errno: EINVAL,
                "aio=native was specified, but it requires cache.direct=on, which was not specified."))
        }
        var flags = (options.readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC
        if options.direct { flags |= strata_O_DIRECT }
        let fd: Int32
        switch ImageFile.open(options.filename, flags: flags) {
        case .success(let opened): fd = opened
        case .failure(let error): return loop.makeFailedFuture(error)
        }
        let blockDevice = strata_is_block_device(fd) == 1
        let size = strata_fd_size(fd)
        guard size >= 0 else {
            Glibc.close(fd)
            return loop.makeFailedFuture(BlockError(errno: Int32(-size),
                "Could not get the size of '\(options.filename)': \(String(cString: strerror(Int32(-size))))"))
        }
        var offsetAlignment = 1
        var memoryAlignment = 1
        if options.direct {
            var memAlign: UInt32 = 0
            var offAlign: UInt32 = 0
            if strata_dio_alignment(fd, &memAlign, &offAlign) == 0 {
                offsetAlignment = Int(offAlign)
                memoryAlignment = Int(max(memAlign, 1))
            } else if blockDevice, case let sector = Int(strata_block_sector_size(fd)), sector > 0 {
                offsetAlignment = sector
                memoryAlignment = sector
            } else {
                offsetAlignment = 4096
                memoryAlignment = 4096
            }
        }
        let make = { (engine: FileIOEngine?, threadsRing: IOURingEngine?) in
            FileDriver(options: options, fd: fd, io: io, engine: engine, threadsRing: threadsRing, isBlockDevice: blockDevice,
                       size: size, offsetAlignment: offsetAlignment, memoryAlignment: memoryAlignment)
        }
        let engine: EventLoopFuture<FileIOEngine?>
        switch options.aio {
        case .threads:
            return io.uringForThreadsMode().map { make(nil, $0) }
        case .native: engine = io.startAIO().map { $0 }
        case .ioUring: engine = io.startURing().map { $0 }
        }
        return engine.map { make($0, nil) }.flatMapErrorThrowing { error in
            Glibc.close(fd)
            throw error
        }
    }

    /// The file's size rounded up to whole 512-byte sectors, as QEMU sees
    /// every file: a 1,000-byte raw image is a 1,024-byte disk whose tail
    /// reads as zeroes (past the end of the file) and grows the file when
    /// written, as with qemu-nbd. Reads and `sendfile` still stop at `size`.
    public var length: Int64 { isBlockDevice ? size : (size + 511) & ~511 }

    public var allocatedFileSize: Int64? {
        let bytes = strata_fd_allocated_bytes(fd)
        return bytes >= 0 ? bytes : nil
    }

    public func refreshLimits(_ limits: inout BlockLimits) {
        limits.requestAlignment = max(limits.requestAlignment, offsetAlignment)
        limits.memoryAlignment = max(limits.memoryAlignment, memoryAlignment)
        // Page-aligned memory for O_DIRECT (see `optimalMemoryAlignment`).
        if options.direct {
            limits.optimalMemoryAlignment = max(limits.optimalMemoryAlignment, CachedFileExtent.pageSize)
        }
        // fallocate on a block device works in whole sectors; on a file,
        // on any range, zeroing what it cannot free (QEMU discards there
        // byte for byte too: a freed 512-byte qcow2 cluster reads as zeroes).
        let sector = isBlockDevice ? max(Int(strata_block_sector_size(fd)), 512) : 1
        limits.discardAlignment = max(limits.discardAlignment, sector)
        limits.zeroAlignment = max(limits.zeroAlignment, sector)
    }

    /// FUA as an `RWF_DSYNC` write only with O_DIRECT; through the page
    /// cache the node emulates it with a flush, as QEMU 7.2 does. A
    /// DSYNC write reports a writeback error of *earlier* writes once, per
    /// open file, and a failed write does not make later flushes fail:
    /// the next `fdatasync` would succeed although acknowledged data was
    /// lost. A flush that fails does (`flushFailure`).
    public var supportedWriteFlags: BlockRequestFlags { options.direct ? [.fua] : [] }
    public var supportedZeroFlags: BlockRequestFlags { [.mayUnmap] }

    // MARK: read

    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
                     flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        readRemaining(at: offset, into: buffer.baseAddress!, count: buffer.count, completion: completion)
    }

    private func readRemaining(at offset: Int64, into pointer: UnsafeMutableRawPointer, count: Int,
                               completion: @escaping BlockCompletion) {
        if let engine {
            return read(on: engine, at: offset, into: pointer, count: count, completion: completion)
        }
        if nowaitReads, count <= Self.largestInlineRead {
            let result = strata_pread(fd, pointer, count, offset, strata_RWF_NOWAIT)
            if result >= 0 {
                return readDone(result, at: offset, into: pointer, count: count, completion: completion)
            }
            if result == -Int(EOPNOTSUPP) || result == -Int(EINVAL) { nowaitReads = false }
            // EAGAIN: not cached (the kernel has started reading it ahead);
            // anything else is retried on the ring or the pool.
        }
        // Large cached reads stay on the pool, whose threads copy them in parallel.
        if let threadsRing, options.direct || count <= Self.largestInlineRead {
            return read(on: threadsRing, at: offset, into: pointer, count: count, completion: completion)
        }
        let fd = self.fd
        let target = SendablePointer(raw: pointer)
        io.runBlocking({ strata_pread(fd, target.raw, count, offset, 0) }) { result in
            self.readDone(result, at: offset, into: pointer, count: count, completion: completion)
        }
    }

    private func read(on engine: FileIOEngine, at offset: Int64, into pointer: UnsafeMutableRawPointer, count: Int,
                      completion: @escaping BlockCompletion) {
        let request = idleRequests.popLast() ?? FileRequest()
        request.begin(driver: self, isWrite: false, fua: false, offset: offset, pointer: pointer, count: count,
                      completion: completion)
        engine.submit(fd: fd, write: false, buffer: pointer, count: count, offset: offset, rwFlags: 0) { result in
            request.end(result)
        }
    }

    func readDone(_ result: Int, at offset: Int64, into pointer: UnsafeMutableRawPointer, count: Int,
                          completion: @escaping BlockCompletion) {
        if result < 0 {
            if result == -Int(EINTR) {
                return readRemaining(at: offset, into: pointer, count: count, completion: completion)
            }
            if result == -Int(EAGAIN) {
                // The kernel is short of resources: retry shortly, without spinning.
                io.eventLoop.scheduleTask(in: .milliseconds(1)) {
                    self.readRemaining(at: offset, into: pointer, count: count, completion: completion)
                }
                return
            }
            return completion(BlockError(errno: Int32(-result)))
        }
        if result == count { return completion(nil) }
        if result == 0 || offset + Int64(result) >= size {
            // End of file: the rest reads as zeroes (a padded tail, or a
            // file shorter than its alignment).
            memset(pointer + result, 0, count - result)
            return completion(nil)
        }
        readRemaining(at: offset + Int64(result), into: pointer + result, count: count - result,
                      completion: completion)
    }

    // MARK: write

    public func write(at offset: Int64, from buffer: UnsafeRawBufferPointer,
                      flags: BlockRequestFlags, completion: @escaping BlockCompletion) {
        writeRemaining(at: offset, from: UnsafeMutableRawPointer(mutating: buffer.baseAddress!),
                       count: buffer.count, fua: flags.contains(.fua), completion: completion)
    }

    private func writeRemaining(at offset: Int64, from pointer: UnsafeMutableRawPointer, count: Int, fua: Bool,
                                completion: @escaping BlockCompletion) {
        if let engine {
            return write(on: engine, at: offset, from: pointer, count: count, fua: fua, completion: completion)
        }
        if !fua, !options.direct {
            if nowaitWrites {
                let result = strata_pwrite(fd, pointer, count, offset, strata_RWF_NOWAIT)
                if result >= 0 {
                    return writeDone(result, at: offset, from: pointer, count: count, fua: fua, completion: completion)
                }
                if result == -Int(EOPNOTSUPP) || result == -Int(EINVAL) { nowaitWrites = false }
            } else {
                let start = NIODeadline.now()
                if start >= inlineWritesResume {
                    let result = strata_pwrite(fd, pointer, count, offset, 0)
                    let end = NIODeadline.now()
                    if end - start > Self.slowInlineWrite { inlineWritesResume = end + Self.inlineWriteBackoff }
                    return writeDone(result, at: offset, from: pointer, count: count, fua: fua, completion: completion)
                }
            }
        }
        if options.direct, let threadsRing {
            return write(on: threadsRing, at: offset, from: pointer, count: count, fua: fua, completion: completion)
        }
        let fd = self.fd
        let source = SendablePointer(raw: pointer)
        let rwFlags = fua ? strata_RWF_DSYNC : 0
        io.runBlocking({ strata_pwrite(fd, source.raw, count, offset, rwFlags) }) { result in
            self.writeDone(result, at: offset, from: pointer, count: count, fua: fua, completion: completion)
        }
    }

    private func write(on engine: FileIOEngine, at offset: Int64, from pointer: UnsafeMutableRawPointer, count: Int,
                       fua: Bool, completion: @escaping BlockCompletion) {
        let request = idleRequests.popLast() ?? FileRequest()
        request.begin(driver: self, isWrite: true, fua: fua, offset: offset, pointer: pointer, count: count,
                      completion: completion)
        engine.submit(fd: fd, write: true, buffer: pointer, count: count, offset: offset,
                      rwFlags: fua ? strata_RWF_DSYNC : 0) { result in
            request.end(result)
        }
    }

    func writeDone(_ result: Int, at offset: Int64, from pointer: UnsafeMutableRawPointer, count: Int,
                           fua: Bool, completion: @escaping BlockCompletion) {
        if result < 0 {
            if result == -Int(EINTR) {
                return writeRemaining(at: offset, from: pointer, count: count, fua: fua, completion: completion)
            }
            if result == -Int(EAGAIN) {
                io.eventLoop.scheduleTask(in: .milliseconds(1)) {
                    self.writeRemaining(at: offset, from: pointer, count: count, fua: fua, completion: completion)
                }
                return
            }
            return completion(BlockError(errno: Int32(-result)))
        }
        if result == count {
            // A write past the end grew the file (a format allocating).
            if offset + Int64(count) > size, !isBlockDevice { size = offset + Int64(count) }
            return completion(nil)
        }
        if result == 0 { return completion(.enospc) }
        writeRemaining(at: offset + Int64(result), from: pointer + result, count: count - result, fua: fua,
                       completion: completion)
    }

    // MARK: flush, zeroes, discard, truncate

    public func flush(completion: @escaping BlockCompletion) {
        if let flushFailure { return completion(flushFailure) }
        let done = { (result: Int) in
            guard result < 0 else { return completion(nil) }
            let error = BlockError(errno: Int32(-result))
            // O_DIRECT writes bypass the page cache: nothing was dropped.
            if !self.options.direct { self.flushFailure = error }
            completion(error)
        }
        if let uring = engine as? IOURingEngine { return uring.fdatasync(fd: fd, completion: done) }
        let fd = self.fd
        io.runBlocking({ Int(strata_fdatasync(fd)) }, completion: done)
    }

    public func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                            completion: @escaping BlockCompletion) {
        let fd = self.fd
        let unmap = flags.contains(.mayUnmap) && !isBlockDevice
        io.runBlocking({
            if unmap {
                let result = strata_punch_hole(fd, offset, length)
                if result == 0 { return 0 }
            }
            return Int(strata_zero_range(fd, offset, length))
        }) { result in
            guard result < 0 else { return completion(nil) }
            // A device or filesystem that cannot zero this range: let the
            // node write zeroes instead.
            let notSupported = [EOPNOTSUPP, ENOTSUP, EINVAL, ENODEV, ENOSYS].contains(Int32(-result))
            completion(notSupported ? .enotsup : BlockError(errno: Int32(-result)))
        }
    }

    public func discard(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        let fd = self.fd
        io.runBlocking({ Int(strata_punch_hole(fd, offset, length)) }) { result in
            completion(result < 0 ? BlockError(errno: Int32(-result)) : nil)
        }
    }

    public func truncate(to length: Int64, completion: @escaping BlockCompletion) {
        guard !isBlockDevice else { return completion(.enotsup) }
        let fd = self.fd
        io.runBlocking({ ftruncate(fd, off_t(length)) == 0 ? 0 : -Int(errno) }) { result in
            if result == 0 { self.size = length }
            completion(result < 0 ? BlockError(errno: Int32(-result)) : nil)
        }
    }

    public func prefetch(at offset: Int64, length: Int64, completion: @escaping BlockCompletion) {
        // Page-cache readahead helps only when the page cache is used.
        guard !options.direct else { return completion(nil) }
        let fd = self.fd
        io.runBlocking({ Int(posix_fadvise(fd, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)) }) { _ in
            completion(nil)
        }
    }

    // MARK: block status

    /// Data and holes from SEEK_DATA/SEEK_HOLE. Block devices are all data.
    public func blockStatus(at offset: Int64, length: Int64,
                            completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        let dataFlags: BlockStatus.Flags = [.data, .allocated, .offsetValid]
        let holeFlags: BlockStatus.Flags = [.zero, .allocated, .offsetValid]
        guard !isBlockDevice else {
            return completion(.success(BlockStatus(flags: dataFlags, length: length, offset: offset)))
        }
        let data = strata_seek_data(fd, offset)
        if data == -Int64(ENXIO) {
            // No data from here to the end of the file.
            return completion(.success(BlockStatus(flags: holeFlags, length: length, offset: offset)))
        }
        if data < 0 {
            // The filesystem cannot tell: call it data.
            return completion(.success(BlockStatus(flags: dataFlags, length: length, offset: offset)))
        }
        if data > offset {
            return completion(.success(BlockStatus(flags: holeFlags, length: min(length, data - offset), offset: offset)))
        }
        let hole = strata_seek_hole(fd, offset)
        let dataEnd = hole < 0 ? offset + length : hole
        completion(.success(BlockStatus(flags: dataFlags, length: max(1, min(length, dataEnd - offset)),
                                        offset: offset)))
    }

    // MARK: permissions

    public func setPermissions(perm: BlockPermission, shared: BlockPermission) throws {
        try locks?.apply(perm: perm, shared: options.forceShare ? .all : shared)
    }

    public func close() {
        try? cacheFile?.close()
        Glibc.close(fd)
    }
}
