/// Lays out a new qcow2 image, as `qemu-img create` does: header, refcount
/// table and blocks, L1 table, and with preallocation=metadata every L2
/// table and data cluster. Pure: it returns the bytes to write and the
/// file length; the caller writes them.
public struct QCOW2ImageBuilder {
    public struct Options: Equatable, Sendable {
        public var size: UInt64
        public var version: UInt32 = 3
        public var clusterBits: UInt32 = 16
        public var refcountBits = 16
        public var lazyRefcounts = false
        public var extendedL2 = false
        public var compression: QCOW2Header.CompressionType = .zlib
        public var preallocateMetadata = false
        public var backingFile: String?
        public var backingFormat: String?
        public var dataFile: String?
        public var dataFileRaw = false

        public init(size: UInt64) {
            self.size = size
        }
    }

    public struct Layout {
        /// What to write, in the order to write it; tables are made a
        /// piece at a time (`forEachPiece`), so a preallocated 64 TiB image
        /// does not have to fit in memory (its L2 tables alone are 8 GiB).
        public var regions: [QCOW2LayoutRegion]
        /// The file's length (clusters past the metadata are sparse).
        public var fileLength: UInt64
        public var header: QCOW2Header

        /// Every region cut into pieces of at most `maxPiece` bytes, in
        /// order: `body(offset, bytes)`.
        public func forEachPiece(maxPiece: Int = 1 << 20, _ body: (UInt64, [UInt8]) throws -> Void) rethrows {
            for region in regions {
                var done: UInt64 = 0
                while done < region.length {
                    let count = Int(min(UInt64(maxPiece), region.length - done))
                    try body(region.offset + done, region.bytes(at: done, count: count))
                    done += UInt64(count)
                }
            }
        }

        /// Every region whole: for images small enough to hold (tests).
        public var writes: [(offset: UInt64, bytes: [UInt8])] {
            regions.map { ($0.offset, $0.bytes(at: 0, count: Int($0.length))) }
        }
    }

    public enum BuildError: Error, CustomStringConvertible, Equatable {
        case invalid(String)
        public var description: String {
            switch self { case .invalid(let text): return text }
        }
    }

    public let options: Options

    public init(options: Options) {
        self.options = options
    }

    /// Checks option combinations with qemu-img's messages, in its order
    /// (so a list with several faults gets its first complaint).
    func validate() throws {
        let o = options
        func refuse(_ message: String) -> BuildError { .invalid(message) }
        let useV3 = "(use version=v3 or greater)"
        if o.extendedL2, o.version == 2 {
            throw refuse("Extended L2 entries are only supported with compatibility level 1.1 and above \(useV3)")
        }
        guard (9...21).contains(o.clusterBits) else {
            throw refuse("Cluster size must be a power of two between 512 and 2048k")
        }
        if o.extendedL2, o.clusterBits < 14 {
            throw refuse("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        if o.preallocateMetadata, o.backingFile != nil, !o.extendedL2 {
            // A preallocated cluster would hide the backing file's data;
            // extended L2 preallocates with every subcluster unallocated.
            throw refuse("Backing file and preallocation can only be used at the same time if extended_l2 is on")
        }
        if o.backingFormat != nil, o.backingFile == nil {
            throw refuse("Backing format cannot be used without backing file")
        }
        if o.lazyRefcounts, o.version == 2 {
            throw refuse("Lazy refcounts only supported with compatibility level 1.1 and above \(useV3)")
        }
        guard [1, 2, 4, 8, 16, 32, 64].contains(o.refcountBits) else {
            throw refuse("Refcount width must be a power of two and may not exceed 64 bits")
        }
        if o.refcountBits != 16, o.version == 2 {
            throw refuse("Different refcount widths than 16 bits require compatibility level 1.1 or above \(useV3)")
        }
        if o.dataFileRaw, o.dataFile == nil {
            throw refuse("data-file-raw requires data-file")
        }
        if o.dataFileRaw, o.backingFile != nil {
            // Raw data has no unallocated clusters for a backing file to show through.
            throw refuse("Backing file and data-file-raw cannot be used at the same time")
        }
        if o.dataFile != nil, o.version == 2 {
            throw refuse("External data files are only supported with compatibility level 1.1 and above \(useV3)")
        }
        if o.compression != .zlib, o.version == 2 {
            throw refuse("Non-zlib compression type is only supported with compatibility level 1.1 and above \(useV3)")
        }
        guard o.size <= QCOW2Header.maxSize else { throw refuse("Image size is too large") }
        if let backing = o.backingFile, backing.utf8.count > 1023 {
            throw refuse("Backing file name too long")
        }
    }

    public func build() throws -> Layout {
        try validate()
        let o = options
        let clusterSize = UInt64(1) << UInt64(o.clusterBits)
        let entrySize: UInt64 = o.extendedL2 ? 16 : 8
        let l2Entries = clusterSize / entrySize
        let bytesPerL2 = l2Entries * clusterSize
        let l1Entries = (o.size + bytesPerL2 - 1) / bytesPerL2
        // QEMU's limit on the L1 table, which every open checks.
        guard l1Entries * 8 <= QCOW2Header.maxL1Bytes else {
            throw BuildError.invalid("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
        }
        let l1Clusters = max(1, (l1Entries * 8 + clusterSize - 1) / clusterSize)
        let dataClusters = (o.size + clusterSize - 1) / clusterSize
        // Metadata preallocation (also implied by a raw data file): every
        // L2 table, and data clusters in the image unless the data lives in
        // an external file.
        let preallocate = o.preallocateMetadata || o.dataFileRaw
        let l2Clusters = preallocate ? l1Entries : 0
        let inImageData = preallocate && o.dataFile == nil ? dataClusters : 0
        let fixed = 1 + l1Clusters + l2Clusters + inImageData
        let perBlock = clusterSize * 8 / UInt64(o.refcountBits)
        var tableClusters: UInt64 = 1
        var blockClusters: UInt64 = 1
        while true {
            let total = fixed + tableClusters + blockClusters
            let neededBlocks = (total + perBlock - 1) / perBlock
            let neededTable = max(1, (neededBlocks * 8 + clusterSize - 1) / clusterSize)
            if neededBlocks <= blockClusters, neededTable <= tableClusters { break }
            blockClusters = max(blockClusters, neededBlocks)
            tableClusters = max(tableClusters, neededTable)
        }
        let tableOffset = clusterSize
        let blocksOffset = tableOffset + tableClusters * clusterSize
        let l1Offset = blocksOffset + blockClusters * clusterSize
        let l2Offset = l1Offset + l1Clusters * clusterSize
        let dataOffset = l2Offset + l2Clusters * clusterSize
        let totalClusters = fixed + tableClusters + blockClusters
        let fileLength = totalClusters * clusterSize

        var header = QCOW2Header(
            version: o.version, backingFileOffset: 0, backingFileSize: 0, clusterBits: o.clusterBits,
            size: o.size, cryptMethod: 0, l1Size: UInt32(l1Entries), l1TableOffset: l1Offset,
            refcountTableOffset: tableOffset, refcountTableClusters: UInt32(tableClusters),
            snapshotCount: 0, snapshotsOffset: 0,
            headerLength: o.version == 2 ? UInt32(QCOW2Header.version2Length) : 112)
        header.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        if o.lazyRefcounts { header.compatibleFeatures.insert(.lazyRefcounts) }
        if o.extendedL2 { header.incompatibleFeatures.insert(.extendedL2) }
        if o.compression == .zstd {
            header.incompatibleFeatures.insert(.compressionType)
            header.compressionType = .zstd
        }
        if let dataFile = o.dataFile {
            header.incompatibleFeatures.insert(.externalDataFile)
            header.extensions.append(QCOW2HeaderExtension(type: QCOW2HeaderExtension.dataFile, data: Array(dataFile.utf8)))
            if o.dataFileRaw { header.autoclearFeatures.insert(.rawExternalData) }
        }
        if let format = o.backingFormat, o.backingFile != nil {
            header.extensions.insert(QCOW2HeaderExtension(type: QCOW2HeaderExtension.backingFormat, data: Array(format.utf8)), at: 0)
        }
        if o.version == 3 {
            header.extensions.append(QCOW2HeaderExtension(type: QCOW2HeaderExtension.featureNames, data: Self.featureNameTable))
        }
        header.backingFile = o.backingFile

        // Refcount table and blocks: every cluster up to the end is used
        // once. Then the L2 tables, if preallocated, and the L1 table.
        var regions = [QCOW2LayoutRegion(offset: 0, bytes: try header.serialize())]
        regions.append(QCOW2LayoutRegion(offset: tableOffset, length: tableClusters * clusterSize,
            content: .entries(QCOW2LayoutRegion.Entries(count: blockClusters, first: blocksOffset, step: clusterSize))))
        regions.append(QCOW2LayoutRegion(offset: blocksOffset, length: blockClusters * clusterSize,
            content: .refcounts(count: totalClusters, bits: o.refcountBits)))
        var l1 = QCOW2LayoutRegion.Entries(count: 0, first: 0, step: 0)
        if preallocate {
            l1 = .init(count: l1Entries, first: l2Offset, step: clusterSize, flags: QCOW2Entry.copied)
            let l2 = QCOW2LayoutRegion.Entries(count: dataClusters, first: o.dataFile == nil ? dataOffset : 0,
                                               step: clusterSize, flags: QCOW2Entry.copied, entrySize: entrySize)
            regions.append(QCOW2LayoutRegion(offset: l2Offset, length: l2Clusters * clusterSize, content: .entries(l2)))
        }
        regions.append(QCOW2LayoutRegion(offset: l1Offset, length: l1Clusters * clusterSize, content: .entries(l1)))
        return Layout(regions: regions, fileLength: fileLength, header: header)
    }

    /// QEMU's feature name table, so tools can name the bits.
    static let featureNameTable: [UInt8] = {
        let names: [(UInt8, UInt8, String)] = [
            (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
            (0, 3, "compression type"), (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
        ]
        var bytes: [UInt8] = []
        for (type, bit, name) in names {
            var entry = [type, bit] + Array(name.utf8)
            entry += [UInt8](repeating: 0, count: 48 - entry.count)
            bytes += entry
        }
        return bytes
    }()
}

/// Writes `value` big-endian into `size` bytes at `offset`.
func put(_ bytes: inout [UInt8], _ offset: Int, _ value: UInt64, _ size: Int) {
    for index in 0..<size {
        bytes[offset + index] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (size - 1 - index)))
    }
}

extension QCOW2Header {
    /// The header cluster's bytes: fixed fields, extensions (unknown ones
    /// kept as read), the end marker, then the backing file name.
    public func serialize() throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(headerLength))
        put(&bytes, 0, UInt64(Self.magic), 4)
        put(&bytes, 4, UInt64(version), 4)
        put(&bytes, 20, UInt64(clusterBits), 4)
        put(&bytes, 24, size, 8)
        put(&bytes, 32, UInt64(cryptMethod), 4)
        put(&bytes, 36, UInt64(l1Size), 4)
        put(&bytes, 40, l1TableOffset, 8)
        put(&bytes, 48, refcountTableOffset, 8)
        put(&bytes, 56, UInt64(refcountTableClusters), 4)
        put(&bytes, 60, UInt64(snapshotCount), 4)
        put(&bytes, 64, snapshotsOffset, 8)
        if version >= 3 {
            put(&bytes, 72, incompatibleFeatures.rawValue, 8)
            put(&bytes, 80, compatibleFeatures.rawValue, 8)
            put(&bytes, 88, autoclearFeatures.rawValue, 8)
            put(&bytes, 96, UInt64(refcountOrder), 4)
            put(&bytes, 100, UInt64(headerLength), 4)
            if headerLength > 104 { bytes[104] = compressionType.rawValue }
        }
        for ext in extensions {
            var entry = [UInt8](repeating: 0, count: 8)
            put(&entry, 0, UInt64(ext.type), 4)
            put(&entry, 4, UInt64(ext.data.count), 4)
            bytes += entry + ext.data + [UInt8](repeating: 0, count: (8 - ext.data.count % 8) % 8)
        }
        bytes += [UInt8](repeating: 0, count: 8)  // end of extensions
        if let backingFile {
            let name = Array(backingFile.utf8)
            put(&bytes, 8, UInt64(bytes.count), 8)
            put(&bytes, 16, UInt64(name.count), 4)
            bytes += name
        }
        guard bytes.count <= clusterSize else {
            throw QCOW2Error("The header does not fit in one cluster")
        }
        return bytes
    }
}
