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
        let printer = Printer(output: image.output)
        do {
            try ImageSession().withImage(image.filename, format: image.format, forceShare: image.forceShare) { node in
                printer.start()
                return Self.map(node, emit: printer.add)
            }
        } catch {
            fail("Could not open '\(image.filename)': \((error as? BlockError)?.description ?? "\(error)")")
        }
        if let refusal = printer.finish() { fail(refusal) }
    }

    /// Prints entries as the walk finds them, merging those that continue
    /// each other: a fragmented image has millions, which held all at once
    /// took gigabytes (qemu-img streams them too). Fed on the image's loop,
    /// finished on the main thread after the walk: one at a time.
    final class Printer: @unchecked Sendable {
        let output: OutputFormat
        private var pending: Entry?
        private var printed = 0
        /// Why the human table stopped, as qemu-img stops it.
        private(set) var refusal: String?

        init(output: OutputFormat) {
            self.output = output
        }

        /// The image is open: the human table gets its heading.
        func start() {
            if output == .human { print("Offset          Length          Mapped to       File") }
        }

        /// Takes the next entry; false once the output has ended early.
        func add(_ entry: Entry) -> Bool {
            if let pending, pending.continues(with: entry) {
                self.pending!.length += entry.length
                return true
            }
            if let pending { write(pending) }
            pending = entry
            return refusal == nil
        }

        /// Ends the output; returns the error to exit with, if any.
        func finish() -> String? {
            if let pending, refusal == nil { write(pending) }
            pending = nil
            if output == .json { print(printed == 0 ? "[]" : "]") }
            return refusal
        }

        private func write(_ entry: Entry) {
            switch output {
            case .json:
                var text = "{ \"start\": \(entry.start), \"length\": \(entry.length), \"depth\": \(entry.depth), "
                    + "\"present\": \(entry.present), \"zero\": \(entry.zero), \"data\": \(entry.data)"
                if let offset = entry.offset { text += ", \"offset\": \(offset)" }
                print((printed == 0 ? "[" : ",\n") + text + "}", terminator: "")
            case .human:
                guard entry.data else { return }
                guard let offset = entry.offset else {
                    // Data with no place in a file (compressed): qemu-img
                    // cannot name one, and stops.
                    refusal = "File contains external, encrypted or compressed clusters."
                    return
                }
                // qemu-img prints %#x: "0" for zero, "0x..." otherwise.
                let hex = { (value: Int64) in value == 0 ? "0" : "0x" + String(value, radix: 16) }
                let columns = [hex(entry.start), hex(entry.length), hex(offset)]
                print(columns.map { $0.padding(toLength: 16, withPad: " ", startingAt: 0) }.joined() + entry.file)
            }
            printed += 1
        }
    }

    /// Walks the whole image, extent by extent, handing each to `emit`
    /// until it answers false.
    static func map(_ top: BlockNode, emit: @escaping (Entry) -> Bool) -> EventLoopFuture<Void> {
        let promise = top.eventLoop.makePromise(of: Void.self)
        func next(_ offset: Int64) {
            guard offset < top.length else { return promise.succeed(()) }
            extent(top, at: offset, length: top.length - offset, depth: 0) { result in
                switch result {
                case .failure(let error):
                    promise.fail(error)
                case .success(let entry):
                    guard emit(entry) else { return promise.succeed(()) }
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
                        offset: hasOffset ? status.offset : nil, file: dataFileName(of: node))))
                }
                guard let backing = node.backing?.node, offset < backing.length else {
                    // Space the node holds for data it does not have yet
                    // (an unallocated subcluster) still shows its offset.
                    let hasOffset = status.flags.contains(.offsetValid)
                    return completion(.success(Entry(start: offset, length: status.length, depth: depth, present: false,
                                                     zero: true, data: false, offset: hasOffset ? status.offset : nil,
                                                     file: hasOffset ? dataFileName(of: node) : "")))
                }
                extent(backing, at: offset, length: min(status.length, backing.length - offset), depth: depth + 1,
                       completion: completion)
            }
        }
    }

    /// The file offsets of `node` point into: its external data file, if
    /// it has one (qemu-img names that file), else its image file.
    static func dataFileName(of node: BlockNode) -> String {
        ImageSession.fileName(of: node.child(named: "data-file")?.node ?? node)
    }
}
