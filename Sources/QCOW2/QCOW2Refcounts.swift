import BlockLayer
import NIOCore
#if canImport(Glibc)
import Glibc
#endif

/// Reading refcounts: the refcount table and its blocks.
public enum QCOW2Refcounts {
    /// The refcount of entry `index` of a refcount block of `bits`-bit
    /// entries: big-endian for 8 bits and up; below that, packed from the
    /// least significant bit of each byte, as QEMU lays them out.
    public static func entry(_ block: UnsafeRawBufferPointer, index: Int, bits: Int) -> UInt64 {
        if bits < 8 {
            let bitOffset = index * bits
            let byte = block[bitOffset / 8]
            return UInt64(byte >> UInt8(bitOffset % 8)) & ((1 << UInt64(bits)) - 1)
        }
        let bytes = bits / 8
        var value: UInt64 = 0
        for position in 0..<bytes { value = value << 8 | UInt64(block[index * bytes + position]) }
        return value
    }

    /// Counts clusters below `endCluster` with a non-zero refcount, stopping
    /// once `limit` is reached.
    static func countReferenced(file: BlockNode, header: QCOW2Header, endCluster: Int64, limit: Int64,
                                completion: @escaping (Result<Int64, BlockError>) -> Void) {
        let tableBytes = Int(header.refcountTableClusters) * header.clusterSize
        guard Int64(header.refcountTableOffset) + Int64(tableBytes) <= file.length else {
            return completion(.failure(BlockError(errno: EIO, "Refcount table lies past the end of the image")))
        }
        let perBlock = Int64(header.clusterSize * 8 / header.refcountBits)
        QCOW2Driver.readBytes(file, at: Int64(header.refcountTableOffset), count: tableBytes).whenComplete { result in
            guard case .success(let tableBytes) = result else {
                if case .failure(let error) = result { completion(.failure(error as? BlockError ?? .eio)) }
                return
            }
            let reader = BigEndianReader(tableBytes)
            let blocks = tableBytes.count / 8
            var count: Int64 = 0
            func next(_ start: Int) {
                // Entries that name no block count nothing: skipped in a
                // loop, since a table holds up to a million of them.
                var blockIndex = start
                while blockIndex < blocks, Int64(blockIndex) * perBlock < endCluster,
                      reader.u64(at: blockIndex * 8) & ~UInt64(511) == 0 {
                    blockIndex += 1
                }
                let first = Int64(blockIndex) * perBlock
                guard blockIndex < blocks, first < endCluster, count < limit else { return completion(.success(count)) }
                let offset = reader.u64(at: blockIndex * 8) & ~UInt64(511)
                guard offset % UInt64(header.clusterSize) == 0, offset < QCOW2Header.maxSize,
                      Int64(offset) + Int64(header.clusterSize) <= file.length else {
                    return completion(.failure(BlockError(errno: EIO, "Refcount block offset 0x\(String(offset, radix: 16)) invalid")))
                }
                QCOW2Driver.readBytes(file, at: Int64(offset), count: header.clusterSize).whenComplete { block in
                    guard case .success(let bytes) = block else {
                        return completion(.failure(BlockError(errno: EIO, "Cannot read a refcount block")))
                    }
                    bytes.withUnsafeBytes { raw in
                        let entries = min(perBlock, endCluster - first)
                        for index in 0..<Int(entries) where entry(raw, index: index, bits: header.refcountBits) != 0 {
                            count += 1
                        }
                    }
                    // A read from the page cache completes at once, inside
                    // this call: going on from a fresh loop task keeps the
                    // stack flat however many blocks the table names.
                    file.eventLoop.execute { next(blockIndex + 1) }
                }
            }
            next(0)
        }
    }
}
