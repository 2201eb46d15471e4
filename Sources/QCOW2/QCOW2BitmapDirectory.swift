import BlockLayer
import NIOCore

/// The directory of persistent dirty bitmaps (header extension 0x23852875,
/// in force while the `bitmaps` autoclear bit is set).
///
/// Strata keeps bitmaps without using them, but checks the directory and
/// the tables of the bitmaps not in use on open, as QEMU does, so an image
/// QEMU refuses is refused here too, naming the bitmap, and a hostile table
/// size never makes a check read gigabytes.
struct QCOW2BitmapDirectory {
    struct Entry {
        /// Where the entry starts in the directory.
        var position: Int
        var tableOffset: UInt64
        var tableSize: Int
        var flags: UInt32
        var granularityBits: Int
        var name: String

        var inUse: Bool { flags & Self.inUseFlag != 0 }
        static let inUseFlag: UInt32 = 1 << 0
        static let autoFlag: UInt32 = 1 << 1
    }

    /// QEMU's limits (`QCOW2_MAX_BITMAPS` and the others).
    static let maxBitmaps = 65535
    static let maxDirectoryBytes = 1024 * maxBitmaps
    static let maxTableEntries = 0x800_0000
    static let maxBitmapBytes: UInt64 = 512 << 20
    static let maxNameBytes = 1023
    static let entryHeaderSize = 24

    var offset: UInt64
    var bytes: [UInt8]
    var entries: [Entry]

    /// The directory of an image with bitmaps in use; nil when it has none
    /// (no extension, or the autoclear bit clear, which makes QEMU ignore them).
    static func load(file: BlockNode, header: QCOW2Header) -> EventLoopFuture<QCOW2BitmapDirectory?> {
        let loop = file.eventLoop
        let extensions = header.extensions.filter { $0.type == QCOW2HeaderExtension.bitmaps }
        guard header.autoclearFeatures.contains(.bitmaps), !extensions.isEmpty else {
            return loop.makeSucceededFuture(nil)
        }
        // QEMU checks each extension as it reads it; the last one counts.
        var count = 0, size: UInt64 = 0, offset: UInt64 = 0
        do {
            for ext in extensions { (count, size, offset) = try location(ext.data, header: header) }
        } catch {
            return loop.makeFailedFuture(error.blockError)
        }
        guard offset <= readLimit - size else {
            return loop.makeFailedFuture(QCOW2Error("Failed to read bitmap directory: Input/output error").blockError)
        }
        return QCOW2Driver.readPaddingWithZeroes(file, at: offset, count: Int(size)).flatMapThrowing { bytes in
            do {
                return QCOW2BitmapDirectory(offset: offset, bytes: bytes, entries: try parse(bytes, count: count, header: header))
            } catch let error as QCOW2Error {
                throw error.blockError
            }
        }.flatMap { directory in
            checkTables(of: directory.entries, file: file, header: header).map { directory }
        }
    }

    /// Where QEMU's reads must end (`BDRV_MAX_LENGTH`: 2^63 rounded down to
    /// a GiB): a directory or table past it fails to read with EIO. Short
    /// of it, what lies past the end of the file reads as zeroes.
    static let readLimit: UInt64 = 0x7fff_ffff_c000_0000

    /// At most this many bytes of bitmap tables are read on an open; the
    /// tables past it go unchecked. Each table is at most 8 MiB (512 MiB of
    /// bitmap in 512-byte clusters), but a hostile directory can name
    /// 65,535 of them.
    static let tableCheckBudget = 64 << 20

    /// QEMU reads every bitmap not in use as it opens an image, and refuses
    /// the open when an entry of its table is malformed (first) or the
    /// table is not the size the disk needs. Strata does not read bitmaps,
    /// but refuses what QEMU refuses. A table past the end of the file
    /// reads as zeroes (valid), as in QEMU; one named twice is read once.
    static func checkTables(of entries: [Entry], file: BlockNode, header: QCOW2Header) -> EventLoopFuture<Void> {
        let loop = file.eventLoop
        // QEMU's bitmaps cover the disk in whole sectors.
        let diskSize = header.size & ~511
        var budget = tableCheckBudget
        var checked: [UInt64: Int] = [:]  // table offset: entries found valid
        var chain = loop.makeSucceededVoidFuture()
        for entry in entries where !entry.inUse {
            guard entry.tableOffset <= readLimit - UInt64(entry.tableSize) * 8 else {
                let reason = "Could not read bitmap_table table from image for bitmap '\(entry.name)': Input/output error"
                chain = chain.flatMapThrowing { throw QCOW2Error(reason).blockError }
                break
            }
            // The entries the file holds, a last one cut short filled out
            // with zeroes.
            let fileLength = UInt64(file.length)
            let inFile = entry.tableOffset < fileLength
                ? min(entry.tableSize * 8, (Int(min(fileLength - entry.tableOffset, 1 << 40)) + 7) / 8 * 8) : 0
            let known = checked[entry.tableOffset, default: 0] * 8 >= inFile
            let readable = !known && inFile > 0 && inFile <= budget
            if readable {
                budget -= inFile
                // Marked before it is judged: a table found malformed ends
                // the chain, and with it the open.
                checked[entry.tableOffset] = inFile / 8
            }
            chain = chain.flatMap {
                guard readable else { return loop.makeSucceededFuture([]) }
                return QCOW2Driver.readPaddingWithZeroes(file, at: entry.tableOffset, count: inFile)
            }.flatMapThrowing { (table: [UInt8]) in
                let reader = BigEndianReader(table)
                guard (0..<table.count / 8).allSatisfy({ tableEntryIsValid(reader.u64(at: $0 * 8), header: header) }) else {
                    throw QCOW2Error("Could not read bitmap_table table from image for bitmap '\(entry.name)': Invalid argument").blockError
                }
                guard entry.tableSize == tableSize(forDisk: diskSize, granularityBits: entry.granularityBits,
                                                   clusterSize: header.clusterSize) else {
                    throw QCOW2Error("Could not read bitmap '\(entry.name)' from image: Invalid argument").blockError
                }
            }
        }
        return chain
    }

    /// A bitmap table entry as QEMU accepts it: no reserved bit set (1-8,
    /// 56-63), and with an offset, one on the cluster grid without the
    /// all-ones flag (bit 0), which only an entry without one may have.
    static func tableEntryIsValid(_ entry: UInt64, header: QCOW2Header) -> Bool {
        let reserved: UInt64 = 0xff00_0000_0000_01fe
        let offset = entry & 0x00ff_ffff_ffff_fe00
        guard entry & reserved == 0 else { return false }
        return offset == 0 || (entry & 1 == 0 && offset % UInt64(header.clusterSize) == 0)
    }

    /// Table entries (clusters) of a bitmap of `diskSize` bytes at one bit
    /// per 2^granularityBits bytes, as QEMU sizes it.
    static func tableSize(forDisk diskSize: UInt64, granularityBits: Int, clusterSize: Int) -> Int {
        guard diskSize > 0 else { return 0 }
        let bits = (diskSize - 1) >> UInt64(granularityBits) + 1
        let bitsPerCluster = UInt64(clusterSize) * 8
        return Int((bits + bitsPerCluster - 1) / bitsPerCluster)
    }

    /// The extension's fields, checked as QEMU checks them.
    static func location(_ data: [UInt8], header: QCOW2Header) throws(QCOW2Error) -> (Int, UInt64, UInt64) {
        guard data.count == 24 else { throw QCOW2Error("bitmaps_ext: Invalid extension length") }
        let reader = BigEndianReader(data)
        guard reader.u32(at: 4) == 0 else { throw QCOW2Error("bitmaps_ext: Reserved field is not zero") }
        let count = Int(reader.u32(at: 0))
        let size = reader.u64(at: 8)
        let offset = reader.u64(at: 16)
        guard count > 0 else { throw QCOW2Error("found bitmaps extension with zero bitmaps") }
        guard count <= maxBitmaps else {
            throw QCOW2Error("bitmaps_ext: Image has \(count) bitmaps, exceeding the QEMU supported maximum of \(maxBitmaps)")
        }
        guard offset % UInt64(header.clusterSize) == 0 else {
            throw QCOW2Error("bitmaps_ext: invalid bitmap directory offset")
        }
        guard size <= UInt64(maxDirectoryBytes) else {
            throw QCOW2Error("bitmaps_ext: bitmap directory size (\(size)) exceeds the maximum supported size (\(maxDirectoryBytes))")
        }
        guard size > 0 else { throw QCOW2Error("Requested bitmap directory size is zero") }
        return (count, size, offset)
    }

    /// The entries of a directory that should hold `count` bitmaps.
    static func parse(_ bytes: [UInt8], count: Int, header: QCOW2Header) throws(QCOW2Error) -> [Entry] {
        let reader = BigEndianReader(bytes)
        var entries: [Entry] = []
        var position = 0
        while position < bytes.count {
            guard position + entryHeaderSize <= bytes.count else { throw QCOW2Error("Broken bitmap directory") }
            guard entries.count < count else {
                throw QCOW2Error("More bitmaps found than specified in header extension")
            }
            let nameSize = Int(reader.u16(at: position + 18))
            let extraSize = Int(reader.u32(at: position + 20))
            // QEMU sums an entry's sizes in a C int: with extra data past
            // about 2 GiB the sum wraps, the entry seems to fit, and the
            // extra data is what gets refused.
            let wrappedSize = (Int32(truncatingIfNeeded: entryHeaderSize + nameSize + extraSize) &+ 7) & ~7
            guard Int(wrappedSize) <= bytes.count - position else { throw QCOW2Error("Broken bitmap directory") }
            guard extraSize == 0 else { throw QCOW2Error("Bitmap extra data is not supported") }
            let next = position + Int(wrappedSize)
            let nameStart = position + entryHeaderSize
            let entry = Entry(position: position, tableOffset: reader.u64(at: position),
                              tableSize: Int(reader.u32(at: position + 8)), flags: reader.u32(at: position + 12),
                              granularityBits: Int(reader.u8(at: position + 17)),
                              name: QCOW2Header.cString(bytes[nameStart..<nameStart + nameSize]))
            guard fits(entry, type: reader.u8(at: position + 16), nameSize: nameSize, header: header) else {
                throw QCOW2Error("Bitmap '\(entry.name)' doesn't satisfy the constraints")
            }
            entries.append(entry)
            position = next
        }
        guard entries.count == count else { throw QCOW2Error("Less bitmaps found than specified in header extension") }
        return entries
    }

    /// QEMU's constraints on one entry: a table somewhere aligned, of at
    /// most 512 MiB of bitmap, granularity 2^9 to 2^31, known flags, a
    /// dirty-tracking bitmap, and (unless marked in use, as after a
    /// resize) enough bits for the disk.
    private static func fits(_ entry: Entry, type: UInt8, nameSize: Int, header: QCOW2Header) -> Bool {
        let knownFlags = Entry.inUseFlag | Entry.autoFlag
        guard entry.tableSize > 0, entry.tableSize <= maxTableEntries, entry.tableOffset != 0,
              entry.tableOffset % UInt64(header.clusterSize) == 0,
              (9...31).contains(entry.granularityBits), entry.flags & ~knownFlags == 0,
              nameSize <= maxNameBytes, type == 1 else { return false }
        let bitmapBytes = UInt64(entry.tableSize) * UInt64(header.clusterSize)
        guard bitmapBytes <= maxBitmapBytes else { return false }
        // QEMU's disk is whole sectors.
        return entry.inUse || header.size & ~511 <= (bitmapBytes * 8) << UInt64(entry.granularityBits)
    }
}
