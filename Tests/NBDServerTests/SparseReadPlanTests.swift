@testable import NBDServer
import Testing

/// How READ replies are cut into data and hole chunks.
@Suite struct SparseReadPlanTests {
    typealias Piece = SparseReadPlan.Piece
    static let k = 1024

    /// A buffer of `count` zero bytes with the given ranges filled.
    func buffer(_ count: Int, data ranges: [Range<Int>]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        for range in ranges { for index in range { bytes[index] = 0xa5 } }
        return bytes
    }

    func plan(_ bytes: [UInt8], offset: UInt64 = 0, dontFragment: Bool = false) -> [Piece] {
        bytes.withUnsafeBytes { SparseReadPlan.pieces(of: $0, offset: offset, dontFragment: dontFragment) }
    }

    @Test func allZeroIsOneHoleWhateverItsSize() {
        #expect(plan(buffer(4 * Self.k, data: [])) == [Piece(start: 0, length: 4 * Self.k, hole: true)])
        #expect(plan(buffer(1 << 20, data: []), dontFragment: true) == [Piece(start: 0, length: 1 << 20, hole: true)])
    }

    @Test func longZeroRunsBecomeHolesShortOnesStayInTheData() {
        let k = Self.k
        let bytes = buffer(512 * k, data: [0..<10, (100 * k)..<(100 * k + 1), (300 * k)..<(301 * k)])
        #expect(plan(bytes) == [
            Piece(start: 0, length: 4 * k, hole: false),
            Piece(start: 4 * k, length: 96 * k, hole: true),
            Piece(start: 100 * k, length: 4 * k, hole: false),
            Piece(start: 104 * k, length: 196 * k, hole: true),
            Piece(start: 300 * k, length: 4 * k, hole: false),
            Piece(start: 304 * k, length: 208 * k, hole: true),
        ])
        // 60 KiB of zeroes between data: one data chunk.
        let short = buffer(256 * k, data: [0..<1, (64 * k)..<(256 * k)])
        #expect(plan(short) == [Piece(start: 0, length: 256 * k, hole: false)])
    }

    @Test func holesFollowTheExportsUnitsNotTheBuffers() {
        let k = Self.k
        // Read at export offset 1 KiB: the first unit ends at 3 KiB into the buffer.
        let bytes = buffer(256 * k, data: [0..<1, (200 * k)..<(256 * k)])
        #expect(plan(bytes, offset: UInt64(k)) == [
            Piece(start: 0, length: 3 * k, hole: false),
            Piece(start: 3 * k, length: 196 * k, hole: true),
            Piece(start: 199 * k, length: 57 * k, hole: false),
        ])
    }

    @Test func dontFragmentAndShortReadsAreOneDataChunk() {
        let k = Self.k
        let sparse = buffer(512 * k, data: [0..<1])
        #expect(plan(sparse, dontFragment: true) == [Piece(start: 0, length: 512 * k, hole: false)])
        #expect(!SparseReadPlan.maySplit(count: 512 * k, dontFragment: true))
        #expect(!SparseReadPlan.maySplit(count: 127 * k, dontFragment: false))
        #expect(plan(buffer(127 * k, data: [0..<1])) == [Piece(start: 0, length: 127 * k, hole: false)])
    }
}
