@testable import BlockLayer
import NIOEmbedded
import Testing

/// The shared request path: padding, read-modify-write, zero fallback,
/// FUA emulation, flush coalescing, detect-zeroes.
@Suite struct RequestPathTests {
    let loop = EmbeddedEventLoop()

    func makeNode(_ driver: MemoryDriver, options: BlockNodeOptions = BlockNodeOptions()) throws -> (BlockGraph, BlockNode) {
        let graph = BlockGraph(eventLoop: loop)
        let node = try graph.addNode(name: "mem", driver: driver, options: options)
        return (graph, node)
    }

    func write(_ node: BlockNode, _ offset: Int64, _ bytes: [UInt8], flags: BlockRequestFlags = []) -> BlockError?? {
        var result: BlockError?? = .none
        bytes.withUnsafeBytes { buffer in
            node.write(at: offset, from: buffer, flags: flags) { result = .some($0) }
        }
        return result
    }

    func read(_ node: BlockNode, _ offset: Int64, _ count: Int) -> [UInt8]? {
        var output = [UInt8](repeating: 0xee, count: count)
        var failed = false
        output.withUnsafeMutableBytes { buffer in
            node.read(at: offset, into: buffer) { failed = $0 != nil }
        }
        return failed ? nil : output
    }

    @Test(arguments: [(513, 1000), (0, 1), (511, 2), (1024, 512), (100, 3000), (4095, 1)])
    func unalignedWriteReadsBack(offset: Int, count: Int) throws {
        let driver = MemoryDriver(size: 8192, alignment: 512)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        var expected = driver.data
        let payload = (0..<count).map { UInt8(truncatingIfNeeded: $0 &+ 0x40) }
        #expect(write(node, Int64(offset), payload) == .some(nil))
        expected.replaceSubrange(offset..<offset + count, with: payload)
        #expect(driver.data == expected)
        #expect(read(node, Int64(offset), count) == payload)
        #expect(read(node, 0, 8192) == expected)
        #expect(driver.misalignedRequests == 0)
    }

    /// Memory that meets the required alignment but not the optimal one
    /// (512 bytes into a page, as a short WRITE's slice of the inbound
    /// bytes can be) is copied to a page before it reaches the driver;
    /// page-aligned memory goes as it is.
    @Test func writesFromMemoryShortOfTheOptimalAlignmentAreBounced() throws {
        let driver = MemoryDriver(size: 16384, alignment: 512)
        driver.memoryAlignment = 512
        driver.optimalMemoryAlignment = 4096
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { memory.deallocate() }
        for index in 0..<8192 { memory[index] = UInt8(truncatingIfNeeded: index &* 5 &+ 1) }
        var results: [BlockError?] = []
        let straddling = UnsafeRawBufferPointer(rebasing: memory[512..<4608])
        node.write(at: 4096, from: straddling) { results.append($0) }
        #expect(graph.bufferPool.taken == 1, "copied")
        let paged = UnsafeRawBufferPointer(rebasing: memory[0..<4096])
        node.write(at: 8192, from: paged) { results.append($0) }
        #expect(graph.bufferPool.taken == 1, "used as it is")
        #expect(results.count == 2 && results.allSatisfy { $0 == nil })
        #expect(driver.writeAddresses.count == 2)
        #expect(driver.writeAddresses.allSatisfy { $0 % 4096 == 0 })
        #expect(driver.writeAddresses.last == Int(bitPattern: memory.baseAddress))
        #expect(Array(driver.data[4096..<8192]) == Array(straddling))
        #expect(Array(driver.data[8192..<12288]) == Array(paged))
    }

    @Test func theLastPartialBlockIsReadableAndWritable() throws {
        // 1000 bytes with 512-byte alignment: padding reaches past the end.
        let driver = MemoryDriver(size: 1000, alignment: 512)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        #expect(read(node, 900, 100) == Array(driver.data[900..<1000]))
        #expect(write(node, 990, [UInt8](repeating: 0x42, count: 10)) == .some(nil))
        #expect(Array(driver.data[990..<1000]) == [UInt8](repeating: 0x42, count: 10))
        #expect(read(node, 1000, 24) == [UInt8](repeating: 0, count: 24), "the padding past the end reads as zeroes")
        #expect(read(node, 1024, 1) == nil, "past the aligned end is refused")
        #expect(driver.misalignedRequests == 0)
    }

    @Test func overlappingUnalignedWritesNeverTear() throws {
        let driver = MemoryDriver(size: 4096, alignment: 512)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        driver.holdCompletions = true
        var results: [BlockError?] = []
        // Two writes into the same 512-byte block, different bytes.
        let first = [UInt8](repeating: 0xaa, count: 100)
        let second = [UInt8](repeating: 0xbb, count: 100)
        first.withUnsafeBytes { buffer in node.write(at: 10, from: buffer) { results.append($0) } }
        second.withUnsafeBytes { buffer in node.write(at: 300, from: buffer) { results.append($0) } }
        // Finish in reverse order of arrival, repeatedly, until all is done.
        while !driver.held.isEmpty { driver.release(order: Array(driver.held.indices.reversed())) }
        #expect(results.count == 2)
        #expect(Array(driver.data[10..<110]) == first)
        #expect(Array(driver.data[300..<400]) == second)
    }

    @Test func writeZeroesFallsBackToZeroBuffers() throws {
        let driver = MemoryDriver(size: 3 << 20, alignment: 512, nativeZeroes: false)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        var result: BlockError?? = .none
        node.writeZeroes(at: 100, length: (2 << 20) + 5, flags: []) { result = .some($0) }
        loop.run()
        #expect(result == .some(nil))
        #expect(driver.data[100..<(100 + (2 << 20) + 5)].allSatisfy { $0 == 0 })
        #expect(driver.data[99] != 0 || driver.data[99] == UInt8(truncatingIfNeeded: 99 &* 7 &+ 3))
        #expect(driver.data[(2 << 20) + 105] == UInt8(truncatingIfNeeded: ((2 << 20) + 105) &* 7 &+ 3))
    }

    @Test func fastZeroWithoutNativeSupportIsNotSupported() throws {
        let driver = MemoryDriver(size: 8192, alignment: 512, nativeZeroes: false)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        let before = driver.data
        var result: BlockError?? = .none
        node.writeZeroes(at: 0, length: 4096, flags: [.noFallback]) { result = .some($0) }
        #expect(result == .some(.enotsup))
        #expect(driver.data == before)
        // Unaligned edges would need data writes too.
        let native = MemoryDriver(size: 8192, alignment: 512)
        let (nativeGraph, nativeNode) = try makeNode(native); defer { withExtendedLifetime(nativeGraph) {} }
        nativeNode.writeZeroes(at: 1, length: 4096, flags: [.noFallback]) { result = .some($0) }
        #expect(result == .some(.enotsup))
    }

    /// A driver that takes zero pieces narrower than its zero alignment
    /// (qcow2) gets the edges as pieces of their own, each inside one
    /// aligned unit, even off the request alignment; where it answers
    /// ENOTSUP the node writes zeroes (read-modify-write where the piece is
    /// off the request alignment), or, for FAST_ZERO, answers ENOTSUP too.
    @Test func zeroEdgesGoToADriverThatTakesThem() throws {
        let unit: Int64 = 65536
        func makeDriver(refusing: Bool) -> MemoryDriver {
            let driver = MemoryDriver(size: 4 << 20, alignment: 512)
            driver.zeroAlignment = Int(unit)
            driver.zeroesPartialUnits = true
            driver.refusesPartialZeroes = refusing
            return driver
        }
        let taking = makeDriver(refusing: false)
        let (graph, node) = try makeNode(taking); defer { withExtendedLifetime(graph) {} }
        var result: BlockError?? = .none
        node.writeZeroes(at: 4096, length: 2 * unit, flags: []) { result = .some($0) }
        loop.run()
        #expect(result == .some(nil))
        node.writeZeroes(at: 5 * unit + 100, length: 1000, flags: [.noFallback]) { result = .some($0) }
        loop.run()
        #expect(result == .some(nil), "a piece off the request alignment is the driver's to zero")
        #expect(taking.zeroCalls == [[4096, unit - 4096], [unit, unit], [2 * unit, 4096], [5 * unit + 100, 1000]])
        #expect(taking.writeCount == 0)
        #expect(taking.data[4096..<Int(2 * unit + 4096)].allSatisfy { $0 == 0 })
        #expect(taking.data[Int(5 * unit + 100)..<Int(5 * unit + 1100)].allSatisfy { $0 == 0 })

        let refusing = makeDriver(refusing: true)
        let (refusingGraph, refusingNode) = try makeNode(refusing); defer { withExtendedLifetime(refusingGraph) {} }
        refusingNode.writeZeroes(at: 4096, length: 2 * unit, flags: []) { result = .some($0) }
        loop.run()
        #expect(result == .some(nil))
        #expect(refusing.zeroCalls == [[4096, unit - 4096], [unit, unit], [2 * unit, 4096]])
        #expect(refusing.writeCount > 0)
        #expect(refusing.data[4096..<Int(2 * unit + 4096)].allSatisfy { $0 == 0 })
        let before = refusing.data
        refusingNode.writeZeroes(at: 3 * unit + 512, length: 1024, flags: [.noFallback]) { result = .some($0) }
        loop.run()
        #expect(result == .some(.enotsup))
        #expect(refusing.zeroCalls.last == [3 * unit + 512, 1024], "offered, then refused")
        #expect(refusing.data == before)
        // Refused off the request alignment: read-modify-write, aligned.
        refusingNode.writeZeroes(at: 5 * unit + 100, length: 1000, flags: []) { result = .some($0) }
        loop.run()
        #expect(result == .some(nil))
        #expect(refusing.zeroCalls.last == [5 * unit + 100, 1000])
        #expect(refusing.data[Int(5 * unit + 100)..<Int(5 * unit + 1100)].allSatisfy { $0 == 0 })
        #expect(refusing.data[Int(5 * unit + 99)] == before[Int(5 * unit + 99)])
        #expect(refusing.data[Int(5 * unit + 1100)] == before[Int(5 * unit + 1100)])
        #expect(refusing.misalignedRequests == 0)
    }

    @Test func fuaIsEmulatedWithFlushWhenTheDriverLacksIt() throws {
        let driver = MemoryDriver(size: 4096, nativeFUA: false)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        #expect(write(node, 0, [1, 2, 3], flags: .fua) == .some(nil))
        #expect(driver.flushCount == 1)
        #expect(driver.fuaWrites == 0)
        let native = MemoryDriver(size: 4096)
        let (nativeGraph, nativeNode) = try makeNode(native); defer { withExtendedLifetime(nativeGraph) {} }
        #expect(write(nativeNode, 0, [1, 2, 3], flags: .fua) == .some(nil))
        #expect(native.flushCount == 0)
        #expect(native.fuaWrites == 1)
    }

    @Test func flushesCoalesceByWriteGeneration() throws {
        let driver = MemoryDriver(size: 4096)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        var done = 0
        node.flush { _ in done += 1 }
        #expect(driver.flushCount == 0, "nothing written: no flush reaches the driver")
        _ = write(node, 0, [1])
        driver.holdCompletions = true
        node.flush { _ in done += 1 }
        node.flush { _ in done += 1 }
        node.flush { _ in done += 1 }
        driver.release()
        #expect(driver.flushCount == 1, "flushes waiting on one with no write since share it")
        #expect(done == 4)
        driver.holdCompletions = false
        node.flush { _ in done += 1 }
        #expect(driver.flushCount == 1)
        _ = write(node, 1, [2])
        node.flush { _ in done += 1 }
        #expect(driver.flushCount == 2)
    }

    @Test func detectZeroesTurnsZeroWritesIntoWriteZeroes() throws {
        let driver = MemoryDriver(size: 8192)
        let (graph, node) = try makeNode(driver, options: BlockNodeOptions(detectZeroes: .on)); defer { withExtendedLifetime(graph) {} }
        #expect(write(node, 0, [UInt8](repeating: 0, count: 4096)) == .some(nil))
        #expect(driver.zeroCount == 1)
        #expect(driver.writeCount == 0)
        #expect(write(node, 0, [0, 0, 1]) == .some(nil))
        #expect(driver.writeCount == 1)
    }

    @Test func rangesAndReadOnlyAreChecked() throws {
        let driver = MemoryDriver(size: 4096)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        #expect(write(node, 4095, [1, 2]) == .some(.einval))
        #expect(read(node, 4096, 1) == nil)
        #expect(read(node, 4096, 0) == [])
        let (readOnlyGraph, readOnly) = try makeNode(MemoryDriver(size: 4096), options: BlockNodeOptions(readOnly: true))
        #expect(write(readOnly, 0, [1]) == .some(.eperm))
        withExtendedLifetime(readOnlyGraph) {}
    }

    @Test func writeErrorsReachTheCaller() throws {
        let driver = MemoryDriver(size: 4096, alignment: 512)
        let (graph, node) = try makeNode(driver); defer { withExtendedLifetime(graph) {} }
        driver.failNextWrite = .enospc
        #expect(write(node, 0, [UInt8](repeating: 1, count: 512)) == .some(.enospc))
        // The tracked request was released: the next write goes through.
        #expect(write(node, 0, [UInt8](repeating: 1, count: 512)) == .some(nil))
    }
}
