import BlockLayer
#if canImport(Glibc)
import Glibc
#endif

/// An in-memory driver for request-path tests: checks that the node only
/// ever hands it aligned requests, records calls, and can hold completions
/// back so tests decide the order in which requests finish.
final class MemoryDriver: BlockDriver {
    let formatName = "memory"
    var data: [UInt8]
    let alignment: Int
    var nativeFUA: Bool
    var nativeZeroes: Bool
    /// When true, completions wait in `held` until `release` runs them.
    var holdCompletions = false
    private(set) var held: [() -> Void] = []
    private(set) var flushCount = 0
    private(set) var writeCount = 0
    private(set) var zeroCount = 0
    private(set) var fuaWrites = 0
    private(set) var misalignedRequests = 0
    var failNextWrite: BlockError?
    /// Memory alignment the driver requires and the one it prefers, as
    /// O_DIRECT's 512 bytes and page.
    var memoryAlignment = 1
    var optimalMemoryAlignment = 1
    /// Where each write's buffer started, in order.
    private(set) var writeAddresses: [Int] = []
    /// The zero alignment the driver states, and whether it takes pieces
    /// narrower than that (answering ENOTSUP for them when
    /// `refusesPartialZeroes`), as qcow2 does.
    var zeroAlignment = 1
    var zeroesPartialUnits = false
    var refusesPartialZeroes = false
    /// Each `writeZeroes` call the driver got, refused or not: offset and length.
    private(set) var zeroCalls: [[Int64]] = []

    init(size: Int, alignment: Int = 1, nativeFUA: Bool = true, nativeZeroes: Bool = true) {
        data = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
        self.alignment = alignment
        self.nativeFUA = nativeFUA
        self.nativeZeroes = nativeZeroes
    }

    var length: Int64 { Int64(data.count) }

    func refreshLimits(_ limits: inout BlockLimits) {
        limits.requestAlignment = alignment
        limits.memoryAlignment = memoryAlignment
        limits.optimalMemoryAlignment = optimalMemoryAlignment
        limits.zeroAlignment = zeroAlignment
    }

    var supportedWriteFlags: BlockRequestFlags { nativeFUA ? [.fua] : [] }
    var supportedZeroFlags: BlockRequestFlags { [.mayUnmap] }

    private func finish(_ body: @escaping () -> Void) {
        if holdCompletions { held.append(body) } else { body() }
    }

    /// Runs held completions, in the given order of indices or as queued.
    func release(order: [Int]? = nil) {
        let pending = held
        held = []
        for index in order ?? Array(pending.indices) { pending[index]() }
    }

    private func checkAlignment(_ offset: Int64, _ count: Int) {
        if offset % Int64(alignment) != 0 || count % alignment != 0 { misalignedRequests += 1 }
    }

    func read(at offset: Int64, into buffer: UnsafeMutableRawBufferPointer, flags: BlockRequestFlags,
              completion: @escaping BlockCompletion) {
        checkAlignment(offset, buffer.count)
        // Snapshot at completion time, like a device that reads late.
        finish {
            for index in 0..<buffer.count {
                let position = Int(offset) + index
                buffer[index] = position < self.data.count ? self.data[position] : 0
            }
            completion(nil)
        }
    }

    func write(at offset: Int64, from buffer: UnsafeRawBufferPointer, flags: BlockRequestFlags,
               completion: @escaping BlockCompletion) {
        checkAlignment(offset, buffer.count)
        writeAddresses.append(Int(bitPattern: buffer.baseAddress))
        writeCount += 1
        if flags.contains(.fua) { fuaWrites += 1 }
        if let failure = failNextWrite {
            failNextWrite = nil
            return finish { completion(failure) }
        }
        let bytes = Array(buffer)
        finish {
            // Bytes past the end (an O_DIRECT tail) are dropped, not appended.
            for (index, byte) in bytes.enumerated() where Int(offset) + index < self.data.count {
                self.data[Int(offset) + index] = byte
            }
            completion(nil)
        }
    }

    func flush(completion: @escaping BlockCompletion) {
        flushCount += 1
        finish { completion(nil) }
    }

    func writeZeroes(at offset: Int64, length: Int64, flags: BlockRequestFlags,
                     completion: @escaping BlockCompletion) {
        guard nativeZeroes else { return completion(.enotsup) }
        zeroCalls.append([offset, length])
        let partial = offset % Int64(zeroAlignment) != 0 || length % Int64(zeroAlignment) != 0
        // Only pieces narrower than the zero alignment may be off the
        // request alignment, and only for a driver that takes them.
        if !(partial && zeroesPartialUnits) { checkAlignment(offset, Int(length)) }
        if partial, refusesPartialZeroes || !zeroesPartialUnits { return completion(.enotsup) }
        zeroCount += 1
        finish {
            for index in Int(offset)..<Int(offset + length) { self.data[index] = 0 }
            completion(nil)
        }
    }
}
