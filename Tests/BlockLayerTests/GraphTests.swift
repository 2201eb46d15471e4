@testable import BlockLayer
import NIOCore
import NIOEmbedded
import Testing

/// Permissions, conflicts and drained sections.
@Suite struct GraphTests {
    let loop = EmbeddedEventLoop()

    @Test func conflictingUsersAreRefusedWithBothNamed() throws {
        let graph = BlockGraph(eventLoop: loop)
        let node = try graph.addNode(name: "disk", driver: MemoryDriver(size: 4096))
        _ = try graph.attachBackend(name: "first", to: node, perm: [.consistentRead, .write],
                                    shared: [.consistentRead, .writeUnchanged])
        #expect {
            _ = try graph.attachBackend(name: "second", to: node, perm: [.consistentRead, .write], shared: .all)
        } throws: { error in
            let text = "\(error)"
            return text.contains("block device 'first'") && text.contains("write") && text.contains("node 'disk'")
        }
        #expect(graph.backends.count == 1, "the failed attach left nothing behind")
        // A reader that shares writing fits next to the writer.
        _ = try graph.attachBackend(name: "reader", to: node, perm: [], shared: .all)
    }

    @Test func permissionsFlowDownByRole() throws {
        let graph = BlockGraph(eventLoop: loop)
        let file = try graph.addNode(name: "file", driver: MemoryDriver(size: 4096))
        let format = try graph.addNode(name: "fmt", driver: MemoryDriver(size: 4096),
                                       children: [.init(name: "file", role: .image, node: file)])
        _ = try graph.attachBackend(name: "user", to: format, perm: .consistentRead, shared: .all)
        // A writable format takes write and resize on its file, and shares neither.
        #expect(file.perm.contains(.write))
        #expect(file.perm.contains(.resize))
        #expect(!file.shared.contains(.write))
        let backingFile = try graph.addNode(name: "base", driver: MemoryDriver(size: 4096))
        let overlay = try graph.addNode(name: "top", driver: MemoryDriver(size: 4096),
                                        children: [.init(name: "backing", role: .backing, node: backingFile)])
        _ = try graph.attachBackend(name: "vm", to: overlay, perm: [.consistentRead, .write], shared: [.consistentRead])
        #expect(backingFile.perm == .consistentRead)
        #expect(backingFile.shared.contains(.writeUnchanged))
    }

    @Test func readOnlyNodesRefuseWriters() throws {
        let graph = BlockGraph(eventLoop: loop)
        let node = try graph.addNode(name: "ro", driver: MemoryDriver(size: 512), options: BlockNodeOptions(readOnly: true))
        #expect(throws: BlockError.self) {
            _ = try graph.attachBackend(name: "w", to: node, perm: .write, shared: .all)
        }
    }

    @Test func duplicateAndInvalidNodeNamesAreRefused() throws {
        let graph = BlockGraph(eventLoop: loop)
        _ = try graph.addNode(name: "a", driver: MemoryDriver(size: 512))
        #expect(throws: BlockError.self) { try graph.addNode(name: "a", driver: MemoryDriver(size: 512)) }
        #expect(throws: BlockError.self) { try graph.addNode(name: "1bad", driver: MemoryDriver(size: 512)) }
        let generated = try graph.addNode(driver: MemoryDriver(size: 512))
        #expect(generated.name.hasPrefix("#block"))
    }

    @Test func drainWaitsForInFlightAndQueuesNewRequests() throws {
        let graph = BlockGraph(eventLoop: loop)
        let driver = MemoryDriver(size: 4096)
        let node = try graph.addNode(name: "disk", driver: driver)
        let backend = try graph.attachBackend(name: "b", to: node, perm: [.consistentRead, .write], shared: .all)
        driver.holdCompletions = true
        var order: [String] = []
        let bytes: [UInt8] = [9]
        bytes.withUnsafeBytes { buffer in
            backend.write(at: 0, from: buffer) { _ in order.append("first") }
        }
        var drained = false
        graph.beginDrain(node).whenSuccess { drained = true }
        loop.run()
        #expect(!drained)
        bytes.withUnsafeBytes { buffer in
            backend.write(at: 1, from: buffer) { _ in order.append("queued") }
        }
        #expect(driver.writeCount == 1, "a request made while drained waits")
        driver.release()
        loop.run()
        #expect(drained)
        #expect(backend.inFlight == 0)
        graph.endDrain(node)
        driver.release()
        #expect(order == ["first", "queued"])
    }

    /// The records a backend counts requests in flight with are reused: as
    /// many exist as requests were ever in flight at once, and each has
    /// ended (in flight 0) before its caller hears of it.
    @Test func backendRequestRecordsAreReused() throws {
        let graph = BlockGraph(eventLoop: loop)
        let driver = MemoryDriver(size: 4096)
        let node = try graph.addNode(name: "disk", driver: driver)
        let backend = try graph.attachBackend(name: "b", to: node, perm: [.consistentRead, .write], shared: .all)
        let bytes = [UInt8](repeating: 7, count: 512)
        let target = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 512)
        defer { target.deallocate() }
        var inFlightSeen: [Int] = []
        func issue() {
            bytes.withUnsafeBytes { buffer in
                backend.write(at: 0, from: buffer) { _ in inFlightSeen.append(backend.inFlight) }
            }
            for index in 0..<2 {
                let half = UnsafeMutableRawBufferPointer(rebasing: target[index * 512..<(index + 1) * 512])
                backend.read(at: 512 * Int64(index + 1), into: half) { _ in inFlightSeen.append(backend.inFlight) }
            }
        }
        driver.holdCompletions = true
        for _ in 0..<2 {
            issue()
            #expect(backend.inFlight == 3 && backend.idleRequests.isEmpty)
            driver.release()
            loop.run()
            #expect(backend.inFlight == 0 && backend.idleRequests.count == 3, "three records, none made the second time")
        }
        #expect(inFlightSeen == [2, 1, 0, 2, 1, 0])
        driver.holdCompletions = false
        for _ in 0..<10 { issue() }
        #expect(backend.idleRequests.count == 3)
    }
}

