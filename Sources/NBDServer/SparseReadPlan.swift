import BlockLayer

/// How a structured READ reply is cut into data and hole chunks: zero runs
/// of at least `minimumHole` bytes, on `unit` boundaries of the export,
/// go as hole chunks (no payload), the rest as data chunks. So a read over
/// a partly sparse range sends only its data, as qemu-nbd's sparse reads
/// do; it is decided from the bytes read, so it is exact for any driver.
///
/// Short holes stay in the data: a chunk header costs 20 bytes or more
/// and the client a round of parsing, so splitting every zero page of
/// ordinary data would cost more than it saves.
struct SparseReadPlan {
    struct Piece: Equatable {
        /// Offset in the read buffer.
        var start: Int
        var length: Int
        var hole: Bool
    }

    static let unit = 4096
    static let minimumHole = 64 * 1024

    /// False when a read of `count` bytes goes as one chunk whatever it
    /// holds (a hole chunk if it is all zero, else a data chunk).
    static func maySplit(count: Int, dontFragment: Bool) -> Bool {
        !dontFragment && count >= 2 * minimumHole
    }

    /// The pieces of `buffer`, read at export offset `offset`, in order.
    /// One piece when the reply must not be fragmented (`NBD_CMD_FLAG_DF`).
    static func pieces(of buffer: UnsafeRawBufferPointer, offset: UInt64, dontFragment: Bool) -> [Piece] {
        let count = buffer.count
        // Split reads need no whole-buffer check first: an all-zero buffer
        // comes out of the unit scan as one hole.
        guard maySplit(count: count, dontFragment: dontFragment) else {
            return [Piece(start: 0, length: count, hole: isAllZero(buffer))]
        }
        var pieces: [Piece] = []
        func append(_ start: Int, _ end: Int, hole: Bool) {
            guard end > start else { return }
            if let last = pieces.last, last.hole == hole {
                pieces[pieces.count - 1].length += end - start
            } else {
                pieces.append(Piece(start: start, length: end - start, hole: hole))
            }
        }
        // Units are aligned to the export, not to the buffer.
        let misalignment = Int(offset % UInt64(unit))
        var unitStart = 0
        var zeroStart: Int?  // start of the zero run in progress
        while unitStart < count {
            let unitEnd = min(count, unitStart == 0 ? unit - misalignment : unitStart + unit)
            let zero = isAllZero(UnsafeRawBufferPointer(rebasing: buffer[unitStart..<unitEnd]))
            if zero {
                if zeroStart == nil { zeroStart = unitStart }
            } else {
                if let start = zeroStart {
                    append(start, unitStart, hole: unitStart - start >= minimumHole)
                    zeroStart = nil
                }
                append(unitStart, unitEnd, hole: false)
            }
            unitStart = unitEnd
        }
        if let start = zeroStart { append(start, count, hole: count - start >= minimumHole) }
        return pieces
    }
}
