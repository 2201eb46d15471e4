import Foundation
import Testing

/// Reading and patching an image file's bytes, big-endian as qcow2 stores
/// them: how the suites damage images qemu-img made.
extension ImageToolRunner {
    func read(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
        let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        return [UInt8](try #require(try handle.read(upToCount: count)))
    }

    func u64(_ path: String, at offset: UInt64) throws -> UInt64 {
        try read(path, at: offset, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
    }

    func u32(_ path: String, at offset: UInt64) throws -> UInt32 {
        try read(path, at: offset, count: 4).reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// Writes `value` big-endian in `width` bytes at `offset`.
    func write(_ path: String, _ value: UInt64, width: Int, at offset: UInt64) throws {
        try write(path, bytes: (0..<width).map { UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - $0))) },
                  at: offset)
    }

    func write(_ path: String, bytes: [UInt8], at offset: UInt64) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? handle.close() }
        try handle.seek(toOffset: offset)
        handle.write(Data(bytes))
    }
}
