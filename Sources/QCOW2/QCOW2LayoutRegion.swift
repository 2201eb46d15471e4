/// One stretch of a new image's metadata (`QCOW2ImageBuilder.Layout`):
/// fixed bytes, or a table described by a rule, whose bytes are made on
/// demand for any part of it.
public struct QCOW2LayoutRegion: Sendable {
    /// A table of big-endian entries: entry `i` (below `count`) is
    /// `first + i * step | flags`; past `count`, zeroes. Extended L2
    /// entries (`entrySize` 16) have a second word, left 0: every
    /// subcluster unallocated, as qemu-img preallocates them.
    public struct Entries: Sendable, Equatable {
        public var count: UInt64
        public var first: UInt64
        public var step: UInt64
        public var flags: UInt64 = 0
        public var entrySize: UInt64 = 8
    }

    public enum Content: Sendable {
        case bytes([UInt8])
        case entries(Entries)
        /// Refcount blocks in which the first `count` clusters are used once.
        case refcounts(count: UInt64, bits: Int)
    }

    public var offset: UInt64
    public var length: UInt64
    public var content: Content

    public init(offset: UInt64, length: UInt64, content: Content) {
        self.offset = offset
        self.length = length
        self.content = content
    }

    public init(offset: UInt64, bytes: [UInt8]) {
        self.init(offset: offset, length: UInt64(bytes.count), content: .bytes(bytes))
    }

    /// `count` bytes from `start` within the region. `start` and `count`
    /// split no entry (any multiple of 16 does).
    public func bytes(at start: UInt64, count: Int) -> [UInt8] {
        precondition(start + UInt64(count) <= length, "past the region")
        switch content {
        case .bytes(let bytes):
            return Array(bytes[Int(start)..<Int(start) + count])
        case .entries(let table):
            var piece = [UInt8](repeating: 0, count: count)
            let size = table.entrySize
            let firstIndex = start / size
            let endIndex = min(table.count, (start + UInt64(count)) / size)
            guard firstIndex < endIndex else { return piece }
            piece.withUnsafeMutableBytes { raw in
                for index in firstIndex..<endIndex {
                    let position = Int(index * size - start)
                    let entry = (table.first + index * table.step) | table.flags
                    raw.storeBytes(of: entry.bigEndian, toByteOffset: position, as: UInt64.self)
                }
            }
            return piece
        case .refcounts(let clusters, let bits):
            var piece = [UInt8](repeating: 0, count: count)
            let firstIndex = start * 8 / UInt64(bits)
            let endIndex = min(clusters, (start + UInt64(count)) * 8 / UInt64(bits))
            guard firstIndex < endIndex else { return piece }
            piece.withUnsafeMutableBytes { raw in
                for index in firstIndex..<endIndex {
                    QCOW2Refcounter.store(raw, index: Int(index - firstIndex), bits: bits, value: 1)
                }
            }
            return piece
        }
    }
}
