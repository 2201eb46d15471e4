import BlockLayer
#if canImport(Glibc)
import Glibc
#endif

/// The qcow2 header (QEMU's docs/interop/qcow2.rst), parsed and checked.
///
/// Everything here comes from an untrusted file: parsing never traps, and
/// `validate` refuses what would make later arithmetic overflow or tables
/// overlap the header, naming the problem.
public struct QCOW2Header: Equatable, Sendable {
    public static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"
    public static let version2Length = 72
    public static let version3Length = 104

    public struct IncompatibleFeatures: OptionSet, Hashable, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let dirty = Self(rawValue: 1 << 0)
        public static let corrupt = Self(rawValue: 1 << 1)
        public static let externalDataFile = Self(rawValue: 1 << 2)
        public static let compressionType = Self(rawValue: 1 << 3)
        public static let extendedL2 = Self(rawValue: 1 << 4)
        public static let known: Self = [.dirty, .corrupt, .externalDataFile, .compressionType, .extendedL2]
    }

    public struct CompatibleFeatures: OptionSet, Hashable, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let lazyRefcounts = Self(rawValue: 1 << 0)
    }

    public struct AutoclearFeatures: OptionSet, Hashable, Sendable {
        public let rawValue: UInt64
        public init(rawValue: UInt64) { self.rawValue = rawValue }
        public static let bitmaps = Self(rawValue: 1 << 0)
        public static let rawExternalData = Self(rawValue: 1 << 1)
        public static let known: Self = [.bitmaps, .rawExternalData]
    }

    public enum CompressionType: UInt8, Sendable {
        case zlib = 0
        case zstd = 1
    }

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: IncompatibleFeatures = []
    public var compatibleFeatures: CompatibleFeatures = []
    public var autoclearFeatures: AutoclearFeatures = []
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32
    public var compressionType: CompressionType = .zlib
    /// Header extensions in file order, unknown ones included, so a header
    /// rewrite keeps them.
    public var extensions: [QCOW2HeaderExtension] = []
    /// The backing file name, if any.
    public var backingFile: String?

    public var clusterSize: Int { 1 << Int(clusterBits) }
    public var hasExtendedL2: Bool { incompatibleFeatures.contains(.extendedL2) }
    /// Bytes per L2 entry: 8, or 16 with extended L2 (entry + subcluster bitmap).
    public var l2EntrySize: Int { hasExtendedL2 ? 16 : 8 }
    public var l2Entries: Int { clusterSize / l2EntrySize }
    public var subclustersPerCluster: Int { hasExtendedL2 ? 32 : 1 }
    public var subclusterSize: Int { clusterSize / subclustersPerCluster }
    public var refcountBits: Int { 1 << Int(refcountOrder) }
    /// Bytes of guest data one L2 table maps.
    public var bytesPerL2: Int64 { Int64(l2Entries) << Int64(clusterBits) }
    /// L1 entries needed to map the whole guest size.
    public var l1EntriesNeeded: Int64 {
        let perL2 = bytesPerL2
        return (Int64(size) + perL2 - 1) / perL2
    }

    /// Where the header extensions end, as QEMU reads them: where the
    /// backing file name begins, else at the end of the header cluster.
    var extensionsEnd: Int {
        backingFileOffset != 0 ? Int(min(backingFileOffset, UInt64(clusterSize))) : clusterSize
    }

    /// The backing format extension's name, read as QEMU reads it: up to
    /// the first NUL, an empty name means none (probe the backing file),
    /// and of two extensions the last wins.
    public var backingFormat: String? {
        let name = extensions.last { $0.type == QCOW2HeaderExtension.backingFormat }.map { Self.cString($0.data) }
        return name?.isEmpty == true ? nil : name
    }

    /// A bitmaps extension without its autoclear bit (a version 2 header
    /// has none): a program that knows nothing of bitmaps wrote the image
    /// since, so QEMU considers every bitmap stale, ignores them and drops
    /// the extension on a read-write open.
    public var hasStaleBitmapsExtension: Bool {
        !autoclearFeatures.contains(.bitmaps) && extensions.contains { $0.type == QCOW2HeaderExtension.bitmaps }
    }

    /// The external data file's name; of two extensions naming one, the
    /// last, as QEMU reads them.
    public var dataFile: String? {
        extensions.last { $0.type == QCOW2HeaderExtension.dataFile }.map { Self.cString($0.data) }
    }

    /// Bytes up to the first NUL, as a C string would end there (QEMU keeps
    /// names it reads from an image as C strings).
    static func cString<Bytes: Collection<UInt8>>(_ bytes: Bytes) -> String {
        String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    /// Largest cluster size QEMU accepts (2 MiB), smallest (512 B).
    public static let minClusterBits: UInt32 = 9
    public static let maxClusterBits: UInt32 = 21
    /// QEMU's limits: a 32 MiB L1 table, an 8 MiB refcount table.
    public static let maxL1Bytes: UInt64 = 32 << 20
    public static let maxRefcountTableBytes: UInt64 = 8 << 20
    /// Guest sizes up to 2^61 bytes keep every offset computation in range.
    public static let maxSize: UInt64 = 1 << 61
    /// The open's error for a snapshot table where none can be, which
    /// `check` reports as qemu-img's check does.
    public static let snapshotTableOffsetInvalid = "Snapshot table offset invalid"
}

/// Errors opening a qcow2 image: every one names the problem.
public struct QCOW2Error: Error, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }

    var blockError: BlockError { BlockError(errno: EINVAL, message) }
}

extension QCOW2Header {
    /// Parses the fixed header and its extensions from the first cluster of
    /// the file (`bytes` may be shorter than a cluster near a small file's end).
    ///
    /// `forCheck`: parsed for `check`, as QEMU opens with BDRV_O_CHECK, a
    /// header without a refcount table passes (the check reports every
    /// cluster's count as lost, and `-r all` rebuilds them); `readOnly`
    /// too, an active L1 table at offset 0 passes (the check reads the
    /// header as the table, as qemu-img does).
    public static func parse(_ bytes: [UInt8], forCheck: Bool = false, readOnly: Bool = true) throws -> QCOW2Header {
        let reader = BigEndianReader(bytes)
        guard bytes.count >= version2Length, reader.u32(at: 0) == magic else {
            throw QCOW2Error("Image is not in qcow2 format")
        }
        let version = reader.u32(at: 4)
        guard version == 2 || version == 3 else {
            throw QCOW2Error("Unsupported qcow2 version \(version)")
        }
        var header = QCOW2Header(
            version: version,
            backingFileOffset: reader.u64(at: 8), backingFileSize: reader.u32(at: 16),
            clusterBits: reader.u32(at: 20), size: reader.u64(at: 24), cryptMethod: reader.u32(at: 32),
            l1Size: reader.u32(at: 36), l1TableOffset: reader.u64(at: 40),
            refcountTableOffset: reader.u64(at: 48), refcountTableClusters: reader.u32(at: 56),
            snapshotCount: reader.u32(at: 60), snapshotsOffset: reader.u64(at: 64),
            headerLength: UInt32(version2Length))
        // Checked in QEMU's order, so that of several problems the same one
        // is named.
        try header.validateClusterBits()
        if version == 3 {
            guard bytes.count >= version3Length else { throw QCOW2Error("qcow2 header truncated") }
            header.incompatibleFeatures = IncompatibleFeatures(rawValue: reader.u64(at: 72))
            header.compatibleFeatures = CompatibleFeatures(rawValue: reader.u64(at: 80))
            header.autoclearFeatures = AutoclearFeatures(rawValue: reader.u64(at: 88))
            header.refcountOrder = reader.u32(at: 96)
            header.headerLength = reader.u32(at: 100)
            guard header.headerLength >= UInt32(version3Length) else { throw QCOW2Error("qcow2 header too short") }
            guard Int(header.headerLength) <= header.clusterSize else {
                throw QCOW2Error("qcow2 header exceeds cluster size")
            }
            guard Int(header.headerLength) <= bytes.count else {
                throw QCOW2Error("qcow2 header length \(header.headerLength) runs past the end of the file")
            }
        }
        guard header.backingFileOffset <= UInt64(header.clusterSize) else {
            throw QCOW2Error("Invalid backing file offset")
        }
        if header.headerLength > 104 {
            guard let type = CompressionType(rawValue: bytes[104]) else {
                throw QCOW2Error("qcow2: unknown compression type: \(bytes[104])")
            }
            header.compressionType = type
        }
        // The incompatible bit says the image is not zlib's, no more, no less.
        if header.compressionType == .zlib, header.incompatibleFeatures.contains(.compressionType) {
            throw QCOW2Error("qcow2: Compression type incompatible feature bit must not be set")
        }
        if header.compressionType != .zlib, !header.incompatibleFeatures.contains(.compressionType) {
            throw QCOW2Error("qcow2: Compression type incompatible feature bit must be set")
        }
        let unknown = header.incompatibleFeatures.subtracting(.known)
        guard unknown.isEmpty else {
            throw QCOW2Error("Unsupported qcow2 feature(s): " + unsupportedFeatures(unknown, bytes: bytes, header: header))
        }
        try header.validateGeometry(fileBytes: bytes.count, forCheck: forCheck, readOnly: readOnly)
        header.extensions = try QCOW2HeaderExtension.parseAll(bytes, from: Int(header.headerLength),
                                                              to: header.extensionsEnd)
        if header.backingFileOffset != 0 {
            // The offset is within the header cluster (checked above).
            let start = Int(header.backingFileOffset)
            guard header.backingFileSize <= min(1023, UInt32(header.clusterSize - start)) else {
                throw QCOW2Error("Backing file name too long")
            }
            // Past the end of a short file the name reads as zeroes; it
            // ends at a zero byte, as QEMU keeps it, and an empty one names
            // no backing file.
            let end = min(start + Int(header.backingFileSize), bytes.count)
            let name = start < end ? cString(bytes[start..<end]) : ""
            header.backingFile = name.isEmpty ? nil : name
        }
        return header
    }

    /// QEMU's list of unsupported incompatible features: those the feature
    /// name table names, in its order, then the rest as one hex mask.
    private static func unsupportedFeatures(_ unknown: IncompatibleFeatures, bytes: [UInt8],
                                            header: QCOW2Header) -> String {
        // The extensions read before any malformed one; of several name
        // tables the last, zero-filled to whole entries.
        let extensions = QCOW2HeaderExtension.parseLeniently(bytes, from: Int(header.headerLength),
                                                            to: header.extensionsEnd)
        var table = extensions.last { $0.type == QCOW2HeaderExtension.featureNames }?.data ?? []
        table += [UInt8](repeating: 0, count: (48 - table.count % 48) % 48)
        var mask = unknown.rawValue
        var names: [String] = []
        for start in stride(from: 0, to: table.count, by: 48) {
            let name = table[(start + 2)..<(start + 48)]
            guard name.first != 0 else { break }  // QEMU's table ends at an empty name
            // QEMU shifts by the bit number as x86 does: modulo 64.
            let bit = UInt64(1) << UInt64(table[start + 1] & 63)
            guard table[start] == 0, mask & bit != 0 else { continue }
            names.append(cString(name))
            mask &= ~bit
        }
        if mask != 0 { names.append("Unknown incompatible feature: \(String(mask, radix: 16))") }
        return names.joined(separator: ", ")
    }

    /// The cluster size QEMU accepts, checked first.
    func validateClusterBits() throws {
        guard clusterBits >= Self.minClusterBits, clusterBits <= Self.maxClusterBits else {
            throw QCOW2Error("Unsupported cluster size: 2^\(clusterBits)")
        }
    }

    /// Checks the numbers that later arithmetic depends on, in QEMU's order
    /// (after the checks `parse` makes first); encryption is judged last,
    /// as QEMU judges it once the tables' places are known.
    private func validateGeometry(fileBytes: Int, forCheck: Bool, readOnly: Bool) throws {
        // Subclusters smaller than a sector (QEMU's words for it).
        if hasExtendedL2, clusterBits < 14 {
            throw QCOW2Error("Unsupported subcluster size: \(clusterSize / 32)")
        }
        guard refcountOrder <= 6 else {
            throw QCOW2Error("Reference count entry width too large; may not exceed 64 bits")
        }
        guard refcountTableClusters > 0 || forCheck else {
            throw QCOW2Error("Image does not contain a reference count table")
        }
        guard UInt64(refcountTableClusters) << UInt64(clusterBits) <= Self.maxRefcountTableBytes else {
            throw QCOW2Error("Reference count table too large")
        }
        let cluster = UInt64(clusterSize)
        // qemu's names, in its messages.
        let refcountTableOffsetValid = refcountTableOffset % cluster == 0 && refcountTableOffset < Self.maxSize
            && (refcountTableOffset != 0 || refcountTableClusters == 0 && forCheck)
        guard refcountTableOffsetValid else { throw QCOW2Error("Reference count table offset invalid") }
        guard snapshotCount <= 65536 else { throw QCOW2Error("Snapshot table too large") }
        // Checked without snapshots too, as QEMU checks it.
        guard snapshotsOffset % cluster == 0, snapshotsOffset <= UInt64(Int64.max) else {
            throw QCOW2Error(Self.snapshotTableOffsetInvalid)
        }
        if snapshotCount > 0 {
            guard snapshotsOffset != 0, snapshotsOffset < Self.maxSize else {
                throw QCOW2Error(Self.snapshotTableOffsetInvalid)
            }
        }
        guard UInt64(l1Size) * 8 <= Self.maxL1Bytes else {
            throw QCOW2Error("Active L1 table too large")
        }
        // QEMU judges the table's place before the disk's size, then (on
        // reading it) the rest: at 0 it would be the header, past 2^61 no
        // file reaches.
        guard l1TableOffset % cluster == 0, l1TableOffset <= UInt64(Int64.max) - UInt64(l1Size) * 8 else {
            throw QCOW2Error("Active L1 table offset invalid")
        }
        // QEMU keeps the L1 index of the disk's end in an int. A table
        // large enough for the rest keeps the size below 2^61.
        let perL2 = UInt64(bytesPerL2)
        let l1Needed = size / perL2 + (size % perL2 == 0 ? 0 : 1)
        guard l1Needed <= UInt64(Int32.max) else { throw QCOW2Error("Image is too big") }
        guard UInt64(l1Size) >= l1Needed else {
            throw QCOW2Error("L1 table is too small")
        }
        let l1TableOffsetValid = l1TableOffset < Self.maxSize
            && (l1TableOffset != 0 || l1Size == 0 || forCheck && readOnly)
        guard l1TableOffsetValid else { throw QCOW2Error("Active L1 table offset invalid") }
        guard cryptMethod <= 2 else {
            throw QCOW2Error("Unsupported encryption method \(cryptMethod)")   // qemu-img's words
        }
        guard cryptMethod == 0 else {
            throw QCOW2Error("qcow2 encryption (\(cryptMethod == 1 ? "AES" : "LUKS")) is not supported yet")
        }
    }
}

/// Reads big-endian integers from a byte array at fixed offsets.
struct BigEndianReader {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func u8(at offset: Int) -> UInt8 { bytes[offset] }
    func u16(at offset: Int) -> UInt16 { UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1]) }
    func u32(at offset: Int) -> UInt32 {
        (offset..<offset + 4).reduce(0) { $0 << 8 | UInt32(bytes[$1]) }
    }
    func u64(at offset: Int) -> UInt64 {
        (offset..<offset + 8).reduce(0) { $0 << 8 | UInt64(bytes[$1]) }
    }
}
