import BlockLayer
import NIOCore

/// The directory of persistent dirty bitmaps (header extension 0x23852875,
/// in force while the `bitmaps` autoclear bit is set).
///
/// Strata keeps bitmaps without using them, but checks the directory on
/// open against QEMU's constraints, so an image QEMU refuses is refused
/// here too, naming the bitmap, and a hostile table size never makes a
/// check read gigabytes.
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
        guard header.autoclearFeatures.contains(.bitmaps),
              let ext = header.extensions.first(where: { $0.type == QCOW2HeaderExtension.bitmaps }) else {
            return loop.makeSucceededFuture(nil)
        }
        let count: Int, size: UInt64, offset: UInt64
        do {
            (count, size, offset) = try location(ext.data, header: header)
        } catch {
            return loop.makeFailedFuture(error.blockError)
        }
        guard Int64(offset) + Int64(size) <= file.length else {
            return loop.makeFailedFuture(QCOW2Error("Bitmap directory lies past the end of the image").blockError)
        }
        return QCOW2Driver.readBytes(file, at: Int64(offset), count: Int(size)).flatMapThrowing { bytes in
            do {
                return QCOW2BitmapDirectory(offset: offset, bytes: bytes, entries: try parse(bytes, count: count, header: header))
            } catch let error as QCOW2Error {
                throw error.blockError
            }
        }
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
        guard size > 0 else { throw QCOW2Error("Requested bitmap directory size is zero") }
        guard size <= UInt64(maxDirectoryBytes) else {
            throw QCOW2Error("bitmaps_ext: bitmap directory size (\(size)) exceeds the maximum supported size (\(maxDirectoryBytes))")
        }
        guard offset % UInt64(header.clusterSize) == 0, offset < QCOW2Header.maxSize else {
            throw QCOW2Error("bitmaps_ext: invalid bitmap directory offset")
        }
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
            let next = position + (entryHeaderSize + nameSize + extraSize + 7) / 8 * 8
            guard next <= bytes.count else { throw QCOW2Error("Broken bitmap directory") }
            guard extraSize == 0 else { throw QCOW2Error("Bitmap extra data is not supported") }
            let nameStart = position + entryHeaderSize
            let entry = Entry(position: position, tableOffset: reader.u64(at: position),
                              tableSize: Int(reader.u32(at: position + 8)), flags: reader.u32(at: position + 12),
                              granularityBits: Int(reader.u8(at: position + 17)),
                              name: String(decoding: bytes[nameStart..<nameStart + nameSize], as: UTF8.self))
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
              entry.tableOffset % UInt64(header.clusterSize) == 0, entry.tableOffset < QCOW2Header.maxSize,
              (9...31).contains(entry.granularityBits), entry.flags & ~knownFlags == 0,
              nameSize <= maxNameBytes, type == 1 else { return false }
        let bitmapBytes = UInt64(entry.tableSize) * UInt64(header.clusterSize)
        guard bitmapBytes <= maxBitmapBytes else { return false }
        return entry.inUse || header.size <= (bitmapBytes * 8) << UInt64(entry.granularityBits)
    }
}
