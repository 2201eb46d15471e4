import BlockLayer
#if canImport(Glibc)
import Glibc
#endif
import NIOCore
import Testing

@Suite(.serialized) struct TransferBuffersTests {
    let megabyte = 1 << 20

    @Test func aMebibyteReadBufferIsOneSlab() {
        // What the NBD server asks for on a 1 MiB O_DIRECT read.
        var buffer = TransferBuffers.allocator.buffer(capacity: megabyte)
        #expect(TransferBuffers.isSlab(buffer))
        let start = buffer.withUnsafeMutableWritableBytes { Int(bitPattern: $0.baseAddress!) }
        #expect(start % megabyte == 0, "a chunk is aligned to its size, so it never straddles a huge page")
        buffer.writeRepeatingByte(0xA5, count: megabyte)
        #expect(bytes(of: buffer) == [0xA5, 0xA5, 0xA5])
    }

    @Test func shortBuffersAreAlignedButNotSlabs() {
        // NIO rounds capacities to powers of two: this is a 32 KiB allocation.
        let buffer = TransferBuffers.allocator.buffer(capacity: 30_000)
        #expect(!TransferBuffers.isSlab(buffer))
        let start = buffer.withUnsafeReadableBytes { Int(bitPattern: $0.baseAddress!) }
        #expect(start % TransferBuffers.alignment == 0, "O_DIRECT needs no padding")
    }

    @Test func transfersFrom64KiBToASlabSuit() {
        #expect(TransferBuffers.suits(length: megabyte, alignment: 4096))
        #expect(TransferBuffers.suits(length: 2 * megabyte, alignment: 512))
        #expect(TransferBuffers.suits(length: 64 << 10, alignment: 4096))
        #expect(TransferBuffers.suits(length: 256 << 10, alignment: 1), "buffered transfers too")
        #expect(!TransferBuffers.suits(length: (64 << 10) - 1, alignment: 4096))
        #expect(!TransferBuffers.suits(length: 2 * megabyte + 1, alignment: 4096), "past one slab")
        #expect(!TransferBuffers.suits(length: megabyte, alignment: 8192), "stricter than the allocator")
        #expect(!TransferBuffers.suits(length: megabyte, alignment: 3072), "not a power of two")
    }

    @Test func buffersShorterThanASlabShareOneInChunksOfTheirOwn() {
        // What nbdcopy's 256 KiB reads ask for, 64 at a time.
        let chunk = 256 << 10
        var buffers = (0..<16).map { _ in TransferBuffers.allocator.buffer(capacity: chunk) }
        #expect(buffers.allSatisfy(TransferBuffers.isSlab))
        let starts = buffers.map { buffer in buffer.withUnsafeReadableBytes { Int(bitPattern: $0.baseAddress!) } }
        #expect(starts.allSatisfy { $0 % chunk == 0 })
        #expect(Set(starts).count == 16)
        #expect(Set(starts.map { $0 / (2 << 20) }).count < 16, "chunks share slabs")
        for index in buffers.indices {
            buffers[index].writeRepeatingByte(UInt8(index), count: chunk)
        }
        for (index, buffer) in buffers.enumerated() {
            #expect(bytes(of: buffer) == Array(repeating: UInt8(index), count: 3))
        }
    }

    @Test func growingPastASlabKeepsTheBytes() {
        var buffer = TransferBuffers.allocator.buffer(capacity: megabyte + 1)
        #expect(TransferBuffers.isSlab(buffer))
        buffer.writeRepeatingByte(7, count: megabyte)
        buffer.writeRepeatingByte(8, count: megabyte)
        buffer.writeBytes([1, 2, 3])  // past 2 MiB: reallocated out of the slab
        #expect(!TransferBuffers.isSlab(buffer))
        #expect(buffer.readableBytes == 2 * megabyte + 3)
        #expect(buffer.getBytes(at: 0, length: 1) == [7])
        #expect(buffer.getBytes(at: megabyte - 1, length: 2) == [7, 8])
        #expect(buffer.getBytes(at: 2 * megabyte - 1, length: 4) == [8, 1, 2, 3])
    }

    @Test func moreBuffersThanSlabsStillWorkAndSlabsComeBack() {
        // 64 slabs exist; a burst beyond them falls back to malloc, and
        // every buffer keeps its own bytes.
        var buffers: [ByteBuffer] = []
        for index in 0..<70 {
            var buffer = TransferBuffers.allocator.buffer(capacity: megabyte + 4096)
            buffer.writeRepeatingByte(UInt8(index), count: megabyte)
            buffers.append(buffer)
        }
        #expect(buffers.filter(TransferBuffers.isSlab).count >= 1)
        #expect(buffers.contains { !TransferBuffers.isSlab($0) }, "70 buffers cannot all be slabs")
        for (index, buffer) in buffers.enumerated() {
            #expect(bytes(of: buffer) == Array(repeating: UInt8(index), count: 3))
        }
        buffers.removeAll()
        // Freed slabs are handed out again, resident ones first: past 16
        // idle slabs the memory goes back to the kernel, and those must not
        // be the next ones used (each would fault in 2 MiB again).
        var again = (0..<8).map { _ in TransferBuffers.allocator.buffer(capacity: megabyte + 4096) }
        #expect(again.allSatisfy(TransferBuffers.isSlab))
        #expect(again.allSatisfy(isResident))
        // Released slabs wait at the bottom of the stack; slabs freed after
        // the burst are kept again while fewer than 16 are kept, so a steady
        // load keeps reusing resident ones.
        for round in 0..<3 {
            for index in again.indices { again[index].writeRepeatingByte(UInt8(round), count: megabyte) }
            again.removeAll()
            again = (0..<8).map { _ in TransferBuffers.allocator.buffer(capacity: megabyte + 4096) }
            #expect(again.allSatisfy(TransferBuffers.isSlab))
            #expect(again.allSatisfy(isResident), "round \(round)")
        }
    }

    @Test func shortBuffersAreRecycledNotMalloced() {
        // What a 4 KiB read asks for with its reply header's page: 8 KiB.
        // A class holds 1,024 of them; taking 5,000 in turn works only if
        // each freed one comes back.
        for round in 0..<5000 {
            var buffer = TransferBuffers.allocator.buffer(capacity: 8192)
            #expect(TransferBuffers.isRecycled(buffer), "round \(round)")
            let start = buffer.withUnsafeMutableWritableBytes { Int(bitPattern: $0.baseAddress!) }
            #expect(start % TransferBuffers.alignment == 0, "O_DIRECT needs no padding")
            buffer.writeRepeatingByte(UInt8(truncatingIfNeeded: round), count: 8192)
            #expect(bytes(of: buffer) == Array(repeating: UInt8(truncatingIfNeeded: round), count: 3))
        }
        #expect(TransferBuffers.recycles(capacity: 32 << 10, alignment: 4096))
        #expect(TransferBuffers.recycles(capacity: 4096 + 512, alignment: 1), "buffered transfers too")
        #expect(!TransferBuffers.recycles(capacity: (32 << 10) + 1, alignment: 4096))
        #expect(!TransferBuffers.recycles(capacity: 8192, alignment: 8192), "stricter than a page")
    }

    @Test func moreShortBuffersThanAClassHoldsStillWork() {
        // The 32 KiB class holds 256: the rest come from malloc, and every
        // buffer keeps its own bytes, also once grown out of its class.
        var buffers = (0..<300).map { index in
            var buffer = TransferBuffers.allocator.buffer(capacity: 32 << 10)
            buffer.writeRepeatingByte(UInt8(truncatingIfNeeded: index), count: 32 << 10)
            return buffer
        }
        #expect(buffers.contains { !TransferBuffers.isRecycled($0) }, "300 cannot all be recycled")
        #expect(buffers.filter(TransferBuffers.isRecycled).count >= 1)
        for (index, buffer) in buffers.enumerated() {
            #expect(bytes(of: buffer) == Array(repeating: UInt8(truncatingIfNeeded: index), count: 3))
        }
        buffers.removeAll()
        var grown = TransferBuffers.allocator.buffer(capacity: 4096)
        #expect(TransferBuffers.isRecycled(grown))
        grown.writeRepeatingByte(1, count: 4096)
        grown.writeRepeatingByte(2, count: 40 << 10)  // past 32 KiB: reallocated out of the classes
        #expect(!TransferBuffers.isRecycled(grown))
        #expect(grown.getBytes(at: 4095, length: 2) == [1, 2])
        #expect(grown.readableBytes == 4096 + 40 << 10)
    }

    /// Whether the buffer's first page is in memory (mincore).
    private func isResident(_ buffer: ByteBuffer) -> Bool {
        buffer.withUnsafeReadableBytes { bytes in
            var vector: UInt8 = 0
            let page = UnsafeMutableRawPointer(mutating: bytes.baseAddress!)
            return mincore(page, 4096, &vector) == 0 && vector & 1 == 1
        }
    }

    /// The first, middle and last byte: enough to see two buffers sharing memory.
    private func bytes(of buffer: ByteBuffer) -> [UInt8] {
        let count = buffer.readableBytes
        return [0, count / 2, count - 1].map { buffer.getInteger(at: buffer.readerIndex + $0, as: UInt8.self)! }
    }
}
