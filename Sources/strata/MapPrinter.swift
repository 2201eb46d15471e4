import Foundation

/// Prints `img map` entries as the walk finds them, merging those that
/// continue each other: a fragmented image has millions, which held all at
/// once took gigabytes (qemu-img streams them too). Fed on the image's
/// loop, finished on the main thread after the walk: one at a time.
final class MapPrinter: @unchecked Sendable {
    let output: OutputFormat
    private var pending: ImgMap.Entry?
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
    func add(_ entry: ImgMap.Entry) -> Bool {
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
        if output == .json {
            // An empty image is one empty entry to qemu-img, not none.
            if printed == 0 {
                write(ImgMap.Entry(start: 0, length: 0, depth: 0, present: false, zero: false, data: false,
                                   offset: nil, file: ""))
            }
            print("]")
        }
        return refusal
    }

    private func write(_ entry: ImgMap.Entry) {
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
            // Space that reads as zeroes (preallocated) is not listed.
            guard !entry.zero else { return }
            // qemu-img prints %#x: "0" for zero, "0x..." otherwise.
            let hex = { (value: Int64) in value == 0 ? "0" : "0x" + String(value, radix: 16) }
            let columns = [hex(entry.start), hex(entry.length), hex(offset)]
            print(columns.map { $0.padding(toLength: 16, withPad: " ", startingAt: 0) }.joined() + entry.file)
        }
        printed += 1
    }
}
