import ArgumentParser
import BlockDrivers
import BlockLayer
import FoundationEssentials
import Glibc
import NIOCore

/// `strata img map`: where each guest range comes from in the chain.
struct ImgMap: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "map", abstract: "Show the allocation map of an image.")

    @OptionGroup var image: ImageArguments

    @Option(name: .customLong("start-offset"), help: "Map from this guest offset on (k, M, G suffixes).")
    var startOffset: String?

    @Option(name: .customLong("max-length"), help: "Map at most this many bytes.")
    var maxLength: String?

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

    /// The walk failed once the image was open.
    struct WalkFailed: Error {
        var error: BlockError
    }

    func run() throws {
        let start = startOffset.map { ImageSize.argument($0, name: "start offset") } ?? 0
        let length = maxLength.map { ImageSize.argument($0, name: "max length") }
        let printer = MapPrinter(output: image.output)
        do {
            try ImageSession().withImage(image.filename, format: image.format, forceShare: image.forceShare) { node in
                printer.start()
                // As qemu-img: the range ends at the image's end, or earlier;
                // an end past 2^63 wraps there, mapping nothing.
                let (sum, overflow) = start.addingReportingOverflow(length ?? node.length)
                let end = overflow ? start : min(sum, node.length)
                return Self.map(node, from: start, to: end, emit: printer.add).flatMapErrorThrowing { error in
                    throw WalkFailed(error: error as? BlockError ?? .eio)
                }
            }
        } catch let failure as WalkFailed {
            // qemu-img's words; what went wrong in the image was told as it
            // was found (the driver's corruption event).
            printer.abandon()
            fail("Could not read file metadata: \(String(cString: strerror(failure.error.errno)))")
        } catch {
            printer.abandon()
            fail("Could not open '\(image.filename)': \((error as? BlockError)?.description ?? "\(error)")")
        }
        if let refusal = printer.finish(start: start) { fail(refusal) }
    }

    /// Walks the image from `start` to `end`, extent by extent, handing
    /// each to `emit` until it answers false.
    static func map(_ top: BlockNode, from start: Int64, to end: Int64,
                    emit: @escaping (Entry) -> Bool) -> EventLoopFuture<Void> {
        let promise = top.eventLoop.makePromise(of: Void.self)
        func next(_ offset: Int64) {
            guard offset < end else { return promise.succeed(()) }
            extent(top, at: offset, length: end - offset, depth: 0) { result in
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
        next(start)
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
