import FoundationEssentials
import Glibc

/// Prints `img map` entries as the walk finds them, merging those that
/// continue each other: a fragmented image has millions, which held all at
/// once took gigabytes (qemu-img streams them too). Fed on the image's
/// loop, finished on the main thread after the walk: one at a time.
final class MapPrinter: @unchecked Sendable {
    let output: OutputFormat
    private var pending: ImgMap.Entry?
    private var printed = 0
    /// Text waiting to go out: written in large pieces, as millions of
    /// lines one `print` each cost more than the walk that found them.
    private var buffer: [UInt8] = []
    /// Why the human table stopped, as qemu-img stops it.
    private(set) var refusal: String?

    init(output: OutputFormat) {
        self.output = output
    }

    /// The image is open: the human table gets its heading, the JSON list
    /// its bracket (qemu-img's, even when the walk then fails).
    func start() {
        append(output == .human ? "Offset          Length          Mapped to       File\n" : "[")
    }

    /// Takes the next entry; false once the output has ended early.
    func add(_ entry: ImgMap.Entry) -> Bool {
        if let pending, pending.continues(with: entry) {
            self.pending!.length += entry.length
            return true
        }
        // Settled, with one more to come: in JSON, its comma goes out now.
        if let pending { write(pending, last: false) }
        pending = entry
        return refusal == nil
    }

    /// Ends the output; returns the error to exit with, if any. `start`
    /// is where the map began (`--start-offset`).
    func finish(start: Int64 = 0) -> String? {
        if let pending, refusal == nil { write(pending, last: true) }
        pending = nil
        if output == .json {
            // An empty range is one empty entry to qemu-img, not none.
            if printed == 0 {
                write(ImgMap.Entry(start: start, length: 0, depth: 0, present: false, zero: false, data: false,
                                   offset: nil, file: ""), last: true)
            }
            append("]\n")
        }
        flushBuffer()
        return refusal
    }

    /// The walk failed: what was written so far still goes out, as
    /// qemu-img's lines do.
    func abandon() {
        flushBuffer()
    }

    private func append(_ text: String) {
        buffer.append(contentsOf: text.utf8)
        if buffer.count >= 1 << 16 { flushBuffer() }
    }

    private func flushBuffer() {
        buffer.withUnsafeBytes { _ = fwrite($0.baseAddress, 1, $0.count, stdout) }
        buffer.removeAll(keepingCapacity: true)
        fflush(stdout)
    }

    private func appendLiteral(_ text: StaticString) {
        text.withUTF8Buffer { buffer.append(contentsOf: $0) }
    }

    private func appendDecimal(_ value: Int64) {
        if value < 0 { buffer.append(UInt8(ascii: "-")) }
        // Lowest digit first, then turned around in place.
        let start = buffer.count
        var rest = value.magnitude
        repeat {
            buffer.append(UInt8(ascii: "0") + UInt8(rest % 10))
            rest /= 10
        } while rest > 0
        buffer[start...].reverse()
    }

    /// qemu-img's `%#-15" PRIx64 " "` column: "0" for zero, "0x…"
    /// otherwise, padded with spaces to 16 characters.
    private func appendColumn(_ value: Int64) {
        let text = value == 0 ? "0" : "0x" + String(value, radix: 16)
        buffer.append(contentsOf: text.utf8)
        if text.utf8.count < 16 { buffer.append(contentsOf: repeatElement(UInt8(ascii: " "), count: 16 - text.utf8.count)) }
    }

    private func write(_ entry: ImgMap.Entry, last: Bool) {
        switch output {
        case .json:
            // Byte by byte: string interpolation, millions of times over,
            // cost more than the walk.
            appendLiteral("{ \"start\": ")
            appendDecimal(entry.start)
            appendLiteral(", \"length\": ")
            appendDecimal(entry.length)
            appendLiteral(", \"depth\": ")
            appendDecimal(Int64(entry.depth))
            appendLiteral(entry.present ? ", \"present\": true" : ", \"present\": false")
            appendLiteral(entry.zero ? ", \"zero\": true" : ", \"zero\": false")
            appendLiteral(entry.data ? ", \"data\": true" : ", \"data\": false")
            if let offset = entry.offset {
                appendLiteral(", \"offset\": ")
                appendDecimal(offset)
            }
            appendLiteral(last ? "}" : "},\n")
            if buffer.count >= 1 << 16 { flushBuffer() }
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
            appendColumn(entry.start)
            appendColumn(entry.length)
            appendColumn(offset)
            append(entry.file + "\n")
        }
        printed += 1
    }
}
