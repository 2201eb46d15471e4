import BlockLayer
import NIOCore

/// An in-memory disk for server tests: zeroes except what is written,
/// with block status that reports untouched 64 KiB regions as holes.
final class RAMDriver: BlockDriver {
    let formatName = "ram"
    var data: [UInt8]
    var holdCompletions = false
    var held: [() -> Void] = []
    /// Reads and writes fail with this while it is set.
    var failure: BlockError?
    /// The memory alignment the node asks of its users, as O_DIRECT would.
    var memoryAlignment = 1
    /// The alignment the node prefers, as O_DIRECT's page size.
    var optimalMemoryAlignment = 1
    /// Where each read and write buffer started, in order.
    var bufferAddresses: [Int] = []
    /// While set, every read is offered as this file's range at the same
    /// offset, as a file driver offers cached ranges for `sendfile`.
    var cachedFile: NIOFileHandle?

    init(size: Int) {
        data = [UInt8](repeating: 0, count: size)
    }

    var length: Int64 { Int64(data.count) }

    func refreshLimits(_ limits: inout BlockLimits) {
        limits.memoryAlignment = max(limits.memoryAlignment, memoryAlignment)
        limits.optimalMemoryAlignment = max(limits.optimalMemoryAlignment, optimalMemoryAlignment)
    }

    private func finish(_ body: @escaping () -> Void) {
        if holdCompletions { held.append(body) } else { body() }
    }

    func release() {
        let pending = held
        held = []
        pending.forEach { $0() }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer, flags: BlockRequestFlags,
              completion: @escaping BlockCompletion) {
        bufferAddresses.append(Int(bitPattern: buffer.baseAddress))
        finish {
            if let failure = self.failure { return completion(failure) }
            for index in 0..<buffer.count { buffer[index] = self.data[Int(offset) + index] }
            completion(nil)
        }
    }

    func cachedFileExtent(at offset: Int64, length: Int) -> CachedFileExtent? {
        cachedFile.map { CachedFileExtent(file: $0, offset: offset, length: length) }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags,
               completion: @escaping BlockCompletion) {
        bufferAddresses.append(Int(bitPattern: buffer.baseAddress))
        // Copied when the write completes, as an I/O engine reads the
        // caller's memory when the I/O runs: the payload must stay intact.
        finish {
            if let failure = self.failure { return completion(failure) }
            for (index, byte) in buffer.enumerated() { self.data[Int(offset) + index] = byte }
            completion(nil)
        }
    }

    func flush(completion: @escaping BlockCompletion) { finish { completion(nil) } }

    func blockStatus(at offset: Int64, length: Int64,
                     completion: @escaping (Result<BlockStatus, BlockError>) -> Void) {
        let region = Int64(65536)
        let end = min(offset + length, (offset / region + 1) * region)
        let zero = data[Int(offset)..<Int(end)].allSatisfy { $0 == 0 }
        completion(.success(BlockStatus(flags: zero ? [.zero, .allocated] : [.data, .allocated], length: end - offset)))
    }
}
