import BlockLayer
import CCompression
#if canImport(Glibc)
import Glibc
#endif

/// Mapping guest ranges and reading them.
extension QCOW2Driver {
    /// A run of guest bytes with one mapping; for `.data`, host offsets run
    /// on contiguously across the run.
    struct Run {
        var mapping: QCOW2ClusterMapping
        var length: Int64
        /// For `.data`/`.zero(host)`: the host offset of the run's first byte.
        var hostOffset: UInt64
    }

    // MARK: L2 tables

    /// The host offset of the L2 table for L1 index `index`; nil when the
    /// L1 entry is empty, an error when it is unaligned (a corruption, as
    /// QEMU words it). Reserved bits are read as clear, as QEMU reads them
    /// (check reports them).
    func l2TableOffset(for index: Int) throws(BlockError) -> UInt64? {
        guard index < l1.count else { return nil }
        let offset = l1[index] & QCOW2Entry.offsetMask
        guard offset != 0 else { return nil }
        if offset & UInt64(geometry.clusterSize - 1) != 0 {
            throw corruption("L2 table offset 0x\(String(offset, radix: 16)) unaligned (L1 index: \(index.alternateHex))")
        }
        return offset
    }

    /// The L2 table for L1 index `index`, from the cache or the file; nil
    /// (success) when the L1 entry is empty.
    func l2Table(for index: Int, completion: @escaping (Result<QCOW2L2Table?, BlockError>) -> Void) {
        let offset: UInt64
        do {
            guard let found = try l2TableOffset(for: index) else { return completion(.success(nil)) }
            offset = found
        } catch {
            return completion(.failure(error))
        }
        if let table = cachedL2Table(at: offset) {
            return completion(.success(table))
        }
        if l2Loads[offset] != nil {
            l2Loads[offset]!.append { completion($0.map { $0 }) }
            return
        }
        guard Int64(offset) + Int64(header.clusterSize) <= file.length else {
            return completion(.failure(BlockError(errno: EIO, "L2 table at 0x\(String(offset, radix: 16)) lies past the end of the image")))
        }
        guard let buffer = AlignedBuffer.allocate(count: header.clusterSize, alignment: 4096) else {
            return completion(.failure(.enomem))
        }
        l2Loads[offset] = [{ completion($0.map { $0 }) }]
        file.read(at: Int64(offset), into: buffer.mutableBytes) { error in
            let waiters = self.l2Loads.removeValue(forKey: offset) ?? []
            let result: Result<QCOW2L2Table, BlockError>
            if let error {
                buffer.deallocate()
                result = .failure(error)
            } else {
                let table = QCOW2L2Table(offset: offset, buffer: buffer, entrySize: self.header.l2EntrySize)
                self.l2Cache.insert(table)
                result = .success(table)
            }
            waiters.forEach { $0(result) }
        }
    }

    /// The L2 table at host `offset` if it is in memory: dirty, pinned or cached.
    func cachedL2Table(at offset: UInt64) -> QCOW2L2Table? {
        dirtyL2[offset] ?? pinnedL2[offset]?.table ?? l2Cache.get(offset)
    }

    /// The run starting at guest `offset`, at most `maxLength` long and
    /// never past the L2 table's coverage.
    func run(at offset: Int64, maxLength: Int64, table: QCOW2L2Table?) throws -> Run {
        let geometry = geometry
        let clusterBits = Int64(geometry.clusterBits)
        let clusterSize = geometry.clusterSize
        let subclusterSize = geometry.subclusterSize
        let tableStart = offset & ~(geometry.bytesPerL2 - 1)
        let limit = min(offset + maxLength, tableStart + geometry.bytesPerL2)
        guard let table else {
            return Run(mapping: .unallocated, length: limit - offset, hostOffset: 0)
        }
        func mapping(at position: Int64) throws -> (QCOW2ClusterMapping, Int64) {
            let index = Int((position - tableStart) >> clusterBits)
            let entry = table.entry(index)
            let bitmap = geometry.extendedL2 ? table.bitmap(index) : nil
            let inCluster = position & (clusterSize - 1)
            let subcluster = Int(inCluster / subclusterSize)
            // Only a corruption report needs the words (no string per lookup).
            var place: String { QCOW2Driver.entryPlace(table, index) }
            guard let mapping = QCOW2Entry.mapping(entry: entry, bitmap: bitmap, subcluster: subcluster,
                                                   clusterBits: UInt32(clusterBits),
                                                   externalData: geometry.externalData) else {
                // Two spaces, as qemu-io 7.2 prints it.
                throw Corruption(what: "Invalid cluster entry found  (\(place))")
            }
            // Reserved bits are QEMU's check's business, not its reads'.
            switch mapping {
            case .data(let host), .zero(.some(let host)), .unallocatedSubcluster(let host):
                if host & UInt64(clusterSize - 1) != 0 {
                    throw Corruption(what: "Cluster allocation offset 0x\(String(host, radix: 16)) unaligned (\(place))")
                }
                // In an external data file a cluster lives at its guest
                // offset; QEMU refuses any other (its words, its parenthesis).
                let guestCluster = UInt64(position - inCluster)
                if geometry.externalData, host != guestCluster {
                    throw Corruption(what: "External data file host cluster offset 0x\(String(host, radix: 16)) does not match guest cluster offset: \(guestCluster.alternateHex), L2 index: \(index.alternateHex))")
                }
            case .compressed where geometry.externalData:
                throw Corruption(what: "Compressed cluster entry found in image with external data file (\(place))")
            default:
                break
            }
            // The extent of this mapping: the rest of the subcluster, or of
            // the whole cluster for compressed data.
            var pieceSize = subclusterSize
            if case .compressed = mapping { pieceSize = clusterSize }
            return (mapping, pieceSize - (position & (pieceSize - 1)))
        }
        let (first, firstLength): (QCOW2ClusterMapping, Int64)
        do {
            (first, firstLength) = try mapping(at: offset)
        } catch let found as Corruption {
            throw corruption(found.what)
        }
        var hostStart: UInt64 = 0
        switch first {
        case .data(let host), .zero(.some(let host)), .unallocatedSubcluster(let host):
            hostStart = host + UInt64(offset & (clusterSize - 1))
        default:
            break
        }
        var length = min(firstLength, limit - offset)
        if case .compressed = first { return Run(mapping: first, length: length, hostOffset: 0) }
        // Extend over following pieces with the same kind (and contiguous data).
        while offset + length < limit {
            let position = offset + length
            // As QEMU: an entry is judged when a run starts at it, so a bad
            // one ends the run before it and fails only the next lookup.
            guard let (next, nextLength) = try? mapping(at: position) else { break }
            var same = false
            switch (first, next) {
            case (.unallocated, .unallocated), (.zero(nil), .zero(nil)):
                same = true
            case (.zero(.some), .zero(.some(let host))), (.data, .data(let host)),
                 (.unallocatedSubcluster, .unallocatedSubcluster(let host)):
                same = host + UInt64(position & (clusterSize - 1)) == hostStart + UInt64(length)
            default: same = false
            }
            guard same else { break }
            length += min(nextLength, limit - position)
        }
        return Run(mapping: first, length: length, hostOffset: hostStart)
    }

    /// Where an L2 entry sits, in the words of QEMU's corruption reports.
    static func entryPlace(_ table: QCOW2L2Table, _ index: Int) -> String {
        "L2 offset: 0x\(String(table.offset, radix: 16)), L2 index: \(index.alternateHex)"
    }

    /// A corruption `run` finds in an entry, told only if the entry
    /// starts the run (further on, it ends the run instead).
    private struct Corruption: Error {
        var what: String
    }

    /// A corruption found reading metadata, for the request to fail with.
    /// As QEMU: a read-only image says so once per open, in its words; a
    /// writable one is marked corrupt on disk too, so that it takes no more
    /// changes, in this open or the next, until a check repairs it. (A
    /// check's own open leaves the marking to the check.) The request does
    /// not wait for the header write; a close does.
    func corruption(_ what: String) -> BlockError {
        if writable {
            if !options.forRepair { markCorrupt(what) }
        } else if !readCorruptionSignalled {
            readCorruptionSignalled = true
            fputs("qcow2: Image is corrupt: \(what); further non-fatal corruption events will be suppressed\n", stderr)
        }
        return BlockError(errno: EIO, what)
    }

    // MARK: read

    /// Where a range sits, whole, in one file's page cache, when its L2
    /// table is in memory already (or its L1 entry is empty): plain data in
    /// the data file, or a range this image leaves unallocated, which reads
    /// through to the backing file (whose own driver answers for it; nil
    /// without one, since that reads as zeroes). Zero, compressed and mixed
    /// ranges, and ranges across two L2 tables, are read as usual.
    public func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        guard let run = runInMemory(at: offset, length: length) else { return nil }
        switch run.mapping {
        case .data:
            let host = Int64(run.hostOffset)
            guard var extent = dataFile.cachedFileExtent(at: host, length: length) else { return nil }
            if dataClustersCanBeFreed {
                // `release` finds the clusters from the extent's offset;
                // a freed cluster must fill whole pages to be punched out
                // alone (see `free`), so smaller ones are not lent.
                guard extent.offset == host, geometry.clusterSize >= CachedFileExtent.pageSize else { return nil }
                lend(&extent)
            }
            return extent
        case .unallocated, .unallocatedSubcluster:
            return backingNode?.cachedFileExtent(at: offset, length: length)
        case .zero, .compressed:
            return nil
        }
    }

    /// The run covering all of `[offset, offset + length)`, looked up
    /// without I/O: nil when its L2 table is not in memory, or when the
    /// range spans more than one run. A corruption found on the way is
    /// signalled (`corruption`) as the general path would signal it.
    private func runInMemory(at offset: Int64, length: Int) -> Run? {
        let table: QCOW2L2Table?
        do {
            if let tableOffset = try l2TableOffset(for: geometry.l1Index(of: offset)) {
                guard let cached = cachedL2Table(at: tableOffset) else { return nil }
                table = cached
            } else {
                table = nil
            }
        } catch {
            return nil
        }
        guard let run = try? run(at: offset, maxLength: Int64(length), table: table),
              run.length == Int64(length) else { return nil }
        return run
    }

    /// Reads L2 table by table: the runs found in a table are read in the
    /// same turn of the event loop that looked them up, so they count as in
    /// flight (`beginUse`) before a discard can free their host clusters
    /// and the allocator hand them to another guest range. (Runs collected
    /// while a later table loads from disk would not be counted yet.)
    public func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer, flags: BlockRequestFlags,
                     completion: @escaping BlockCompletion) {
        if readWithinOneRun(at: offset, into: buffer, completion: completion) { return }
        let group = PendingGroup(completion: completion)
        let end = offset + Int64(buffer.count)
        func next(_ position: Int64) {
            guard position < end else { return group.finishIssuing() }
            let index = geometry.l1Index(of: position)
            l2Table(for: index) { loaded in
                switch loaded {
                case .failure(let error):
                    group.fail(error)
                    group.finishIssuing()
                case .success(let table):
                    var position = position
                    let tableEnd = min(end, (Int64(index) + 1) * self.geometry.bytesPerL2)
                    do {
                        while position < tableEnd {
                            let run = try self.run(at: position, maxLength: tableEnd - position, table: table)
                            let start = Int(position - offset)
                            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[start..<start + Int(run.length)])
                            self.read(run, at: position, into: piece, group: group)
                            position += run.length
                        }
                    } catch {
                        group.fail(error as? BlockError ?? .eio)
                        return group.finishIssuing()
                    }
                    next(position)
                }
            }
        }
        next(offset)
    }

    /// The common cases, straight through: the whole request is one run of
    /// an L2 table in memory (or of an empty L1 entry), either data inside
    /// the data file or unallocated over a backing file that holds all of
    /// it. One read, without the group and closures the general path
    /// allocates (callgrind: 1,100 of the server's 30,800 instructions per
    /// 4 KiB read). False, with no read started, for anything else.
    private func readWithinOneRun(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer,
                                  completion: @escaping BlockCompletion) -> Bool {
        guard buffer.count > 0 else { return false }
        let host: Int64
        let inCluster = geometry.offsetInCluster(offset)
        if !geometry.extendedL2, !geometry.externalData, inCluster + Int64(buffer.count) <= geometry.clusterSize,
           let tableOffset = try? l2TableOffset(for: geometry.l1Index(of: offset)),
           let table = cachedL2Table(at: tableOffset),
           let cluster = QCOW2Entry.plainDataCluster(table.entry(geometry.l2Slot(of: geometry.cluster(of: offset))),
                                                     clusterSize: geometry.clusterSize) {
            // Within one plain data cluster: no need for the general decode.
            host = Int64(cluster) + inCluster
        } else {
            // Errors are the general path's to report.
            guard let run = runInMemory(at: offset, length: buffer.count) else { return false }
            switch run.mapping {
            case .data:
                host = Int64(run.hostOffset)
            case .unallocated, .unallocatedSubcluster:
                // The general path's `readBacking`, when the backing file holds it all.
                guard let backing = backingNode, offset + Int64(buffer.count) <= backing.length else { return false }
                backing.read(at: offset, into: buffer, completion: completion)
                return true
            case .zero, .compressed:
                return false
            }
        }
        let node = dataFile
        // Data past the end of the file reads as zeroes: the general path's.
        guard host + Int64(buffer.count) <= node.length else { return false }
        node.read(at: host, into: buffer, completion: countingUse(completion))
        return true
    }

    private func read(_ run: Run, at position: Int64, into piece: UnsafeMutableRawBufferPointer, group: PendingGroup) {
        switch run.mapping {
        case .zero:
            piece.initializeMemory(as: UInt8.self, repeating: 0)
        case .unallocated, .unallocatedSubcluster:
            readBacking(at: position, into: piece, group: group)
        case .data:
            readClamped(dataFile, at: Int64(run.hostOffset), into: piece, group: group)
        case .compressed(let host, let size):
            readCompressed(host: host, size: size, guestOffset: position, into: piece, group: group)
        }
    }

    /// Reads from the backing file what it has, zeroes past its end.
    private func readBacking(at position: Int64, into piece: UnsafeMutableRawBufferPointer, group: PendingGroup) {
        guard let backing = backingNode, position < backing.length else {
            piece.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let available = Int(min(Int64(piece.count), backing.length - position))
        if available < piece.count {
            UnsafeMutableRawBufferPointer(rebasing: piece[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        group.begin()
        backing.read(at: position, into: UnsafeMutableRawBufferPointer(rebasing: piece[..<available])) { group.end($0) }
    }

    /// Reads host data; what lies past the end of the file reads as zeroes,
    /// as it does through QEMU's file driver.
    private func readClamped(_ node: BlockNode, at host: Int64, into piece: UnsafeMutableRawBufferPointer,
                             group: PendingGroup) {
        let available = Int(max(0, min(Int64(piece.count), node.length - host)))
        if available < piece.count {
            UnsafeMutableRawBufferPointer(rebasing: piece[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        guard available > 0 else { return }
        group.begin()
        node.read(at: host, into: UnsafeMutableRawBufferPointer(rebasing: piece[..<available]),
                  completion: countingUse { group.end($0) })
    }

    private func readCompressed(host: UInt64, size: Int, guestOffset: Int64,
                                into piece: UnsafeMutableRawBufferPointer, group: PendingGroup) {
        let clusterSize = header.clusterSize
        let fileLength = file.length
        guard Int64(host) < fileLength else {
            return group.fail(BlockError(errno: EIO, "Compressed cluster at 0x\(String(host, radix: 16)) lies past the end of the image"))
        }
        // The size is rounded up to sectors: the last cluster may end past EOF.
        let readSize = Int(min(Int64(size), fileLength - Int64(host)))
        guard let compressed = AlignedBuffer.allocate(count: readSize, alignment: 4096),
              let cluster = AlignedBuffer.allocate(count: clusterSize, alignment: 4096) else {
            return group.fail(.enomem)
        }
        let type = header.compressionType
        group.begin()
        let epoch = beginUse()
        file.read(at: Int64(host), into: compressed.mutableBytes) { error in
            self.endUse(epoch)
            defer {
                compressed.deallocate()
                cluster.deallocate()
            }
            if let error { return group.end(error) }
            let status: Int32
            switch type {
            case .zlib: status = strata_inflate_raw(compressed.pointer, readSize, cluster.pointer, clusterSize)
            case .zstd: status = strata_zstd_decompress(compressed.pointer, readSize, cluster.pointer, clusterSize)
            }
            guard status == 0 else {
                return group.end(BlockError(errno: EIO, "Compressed cluster at 0x\(String(host, radix: 16)) is corrupt"))
            }
            let inCluster = Int(guestOffset & Int64(clusterSize - 1))
            piece.baseAddress!.copyMemory(from: cluster.pointer + inCluster, byteCount: piece.count)
            group.end(nil)
        }
    }

    // MARK: block status

    public func blockStatus(at offset: Int64, length: Int64,
                            completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        let index = geometry.l1Index(of: offset)
        l2Table(for: index) { loaded in
            switch loaded {
            case .failure(let error):
                completion(.failure(error))
            case .success(let table):
                let run: Run
                do {
                    run = try self.run(at: offset, maxLength: length, table: table)
                } catch {
                    return completion(.failure(error as? BlockError ?? .eio))
                }
                switch run.mapping {
                case .unallocated:
                    completion(.success(BlockStatus(flags: [], length: run.length)))
                case .unallocatedSubcluster:
                    completion(.success(BlockStatus(flags: [.offsetValid], length: run.length,
                                                    offset: Int64(run.hostOffset))))
                case .zero(let host):
                    let flags: BlockStatus.Flags = host == nil ? [.zero, .allocated] : [.zero, .allocated, .offsetValid]
                    completion(.success(BlockStatus(flags: flags, length: run.length, offset: Int64(run.hostOffset))))
                case .compressed:
                    completion(.success(BlockStatus(flags: [.data, .allocated], length: run.length)))
                case .data:
                    let host = Int64(run.hostOffset)
                    let plain = BlockStatus(flags: [.data, .allocated, .offsetValid], length: run.length, offset: host)
                    self.isMetadataPreallocated { preallocated in
                        guard preallocated else { return completion(.success(plain)) }
                        // As QEMU: in a preallocated image, data over a hole
                        // of the file reads as zero.
                        let data = self.dataFile
                        guard host < data.length else {
                            return completion(.success(BlockStatus(flags: [.data, .zero, .allocated, .offsetValid],
                                                                   length: run.length, offset: host)))
                        }
                        data.blockStatus(at: host, length: min(run.length, data.length - host)) { fileStatus in
                            var status = plain
                            if case .success(let inner) = fileStatus {
                                if inner.flags.contains(.zero) { status.flags.insert(.zero) }
                                status.length = min(status.length, inner.length)
                            }
                            completion(.success(status))
                        }
                    }
                }
            }
        }
    }
}

extension QCOW2Driver {
    /// QEMU's test for metadata preallocation: far more clusters in use by
    /// refcount than the file has blocks allocated.
    func isMetadataPreallocated(_ completion: @escaping (Bool) -> Void) {
        if let known = metadataPreallocation { return completion(known) }
        preallocationWaiters.append(completion)
        guard preallocationWaiters.count == 1 else { return }
        let finish = { (value: Bool) in
            self.metadataPreallocation = value
            let waiters = self.preallocationWaiters
            self.preallocationWaiters = []
            waiters.forEach { $0(value) }
        }
        guard let allocated = file.driver.allocatedFileSize ?? file.primaryChild?.node.driver.allocatedFileSize else {
            return finish(false)
        }
        let realClusters = allocated / Int64(header.clusterSize)
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        let endCluster = (file.length + Int64(header.clusterSize) - 1) / Int64(header.clusterSize)
        QCOW2Refcounts.countReferenced(file: file, header: header, endCluster: endCluster, limit: threshold) { result in
            if case .success(let count) = result { finish(count >= threshold) } else { finish(false) }
        }
    }
}

/// Counts the pieces of one request in flight; completes once, with the
/// first error, when all have ended and no more will be issued.
final class PendingGroup {
    private var pending = 1
    private var error: BlockError?
    private let completion: BlockCompletion

    init(completion: @escaping BlockCompletion) {
        self.completion = completion
    }

    func begin() { pending += 1 }

    func end(_ error: BlockError?) {
        if self.error == nil { self.error = error }
        pending -= 1
        if pending == 0 { completion(self.error) }
    }

    /// Records a failure of a piece that was never begun.
    func fail(_ error: BlockError) {
        if self.error == nil { self.error = error }
    }

    func finishIssuing() { end(nil) }
}
