import ArgumentParser
import BlockDrivers
import BlockLayer
import Foundation
import NIOCore

/// `strata img map`: where each guest range comes from in the chain.
struct ImgMap: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "map", abstract: "Show the allocation map of an image.")

    @OptionGroup var image: ImageArguments


    struct Entry: Equatable {
        var start: Int64
        var length: Int64
        var depth: Int
        var present: Bool
        var zero: Bool
        var data: Bool
        var offset: Int64?
        var file: String

        /// True if `next` continues this entry (qemu-img merges those).
        func continues(with next: Entry) -> Bool {
            guard depth == next.depth, present == next.present, zero == next.zero, data == next.data,
                  file == next.file, start + length == next.start else { return false }
            switch (offset, next.offset) {
            case (nil, nil): return true
            case (let a?, let b?): return a + length == b
            default: return false
            }
        }
    }

    func run() throws {
        let entries: [Entry]
        do {
            entries = try ImageSession().withImage(image.filename, format: image.format, forceShare: image.forceShare) { node in
                Self.map(node)
            }
        } catch {
            fail("Could not open '\(image.filename)': \((error as? BlockError)?.description ?? "\(error)")")
        }
        switch image.output {
        case .json:
            let lines = entries.map { entry -> String in
                var text = "{ \"start\": \(entry.start), \"length\": \(entry.length), \"depth\": \(entry.depth), "
                    + "\"present\": \(entry.present), \"zero\": \(entry.zero), \"data\": \(entry.data)"
                if let offset = entry.offset { text += ", \"offset\": \(offset)" }
                return text + "}"
            }
            print("[" + lines.joined(separator: ",\n") + "]")
        case .human:
            print("Offset          Length          Mapped to       File")
            for entry in entries where entry.data && entry.offset != nil {
                // qemu-img prints %#x: "0" for zero, "0x..." otherwise.
                let hex = { (value: Int64) in value == 0 ? "0" : "0x" + String(value, radix: 16) }
                let columns = [hex(entry.start), hex(entry.length), hex(entry.offset!)]
                print(columns.map { $0.padding(toLength: 16, withPad: " ", startingAt: 0) }.joined() + entry.file)
            }
        }
    }

    /// Walks the whole image, extent by extent.
    static func map(_ top: BlockNode) -> EventLoopFuture<[Entry]> {
        let promise = top.eventLoop.makePromise(of: [Entry].self)
        var entries: [Entry] = []
        func next(_ offset: Int64) {
            guard offset < top.length else { return promise.succeed(entries) }
            extent(top, at: offset, length: top.length - offset, depth: 0) { result in
                switch result {
                case .failure(let error):
                    promise.fail(error)
                case .success(let entry):
                    if let last = entries.last, last.continues(with: entry) {
                        entries[entries.count - 1].length += entry.length
                    } else {
                        entries.append(entry)
                    }
                    // One loop tick per extent keeps the stack flat.
                    top.eventLoop.execute { next(offset + entry.length) }
                }
            }
        }
        next(0)
        return promise.futureResult
    }

    static func extent(_ node: BlockNode, at offset: Int64, length: Int64, depth: Int,
                       completion: @escaping (Result<Entry, BlockError>) -> Void) {
        node.blockStatus(at: offset, length: length) { result in
            switch result {
            case .failure(let error):
                completion(.failure(error))
            case .success(let status):
                if status.flags.contains(.allocated) {
                    let hasOffset = status.flags.contains(.offsetValid)
                    return completion(.success(Entry(
                        start: offset, length: status.length, depth: depth, present: true,
                        zero: status.flags.contains(.zero), data: status.flags.contains(.data),
                        offset: hasOffset ? status.offset : nil, file: ImageSession.fileName(of: node))))
                }
                guard let backing = node.backing?.node, offset < backing.length else {
                    // Space the node holds for data it does not have yet
                    // (an unallocated subcluster) still shows its offset.
                    let hasOffset = status.flags.contains(.offsetValid)
                    return completion(.success(Entry(start: offset, length: status.length, depth: depth, present: false,
                                                     zero: true, data: false, offset: hasOffset ? status.offset : nil,
                                                     file: hasOffset ? ImageSession.fileName(of: node) : "")))
                }
                extent(backing, at: offset, length: min(status.length, backing.length - offset), depth: depth + 1,
                       completion: completion)
            }
        }
    }
}
