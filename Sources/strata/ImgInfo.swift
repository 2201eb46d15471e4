import ArgumentParser
import BlockDrivers
import BlockLayer
import FoundationEssentials
import Glibc
import NIOCore
import QCOW2

/// `strata img info`: qemu-img info's fields, human or JSON.
struct ImgInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show what an image is.")

    @OptionGroup var image: ImageArguments

    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain.")
    var backingChain = false


    func run() throws {
        // As qemu-img info: each image of the chain is opened on its own,
        // without its backing file, and only metadata is read (a missing
        // data file is no error). So an error names the image it is about.
        var layers: [QemuJSON] = []
        var filename = image.filename
        var format = image.format
        var seen: Set<String> = []
        while true {
            seen.insert(filename)
            let layer: QemuJSON
            do {
                layer = try ImageSession().withImage(filename, format: format, forceShare: image.forceShare,
                                                     openBacking: false, metadataOnly: true) { node in
                    node.eventLoop.makeSucceededFuture(Self.describe(node))
                }
            } catch {
                fail("Could not open '\(filename)': \((error as? BlockError)?.description ?? "\(error)")")
            }
            layers.append(layer)
            guard backingChain, case .string(let backing)? = layer["full-backing-filename"] else { break }
            if seen.contains(backing) { fail("Backing file '\(backing)' creates an infinite loop.") }
            filename = backing
            if case .string(let backingFormat)? = layer["backing-filename-format"] {
                format = backingFormat
            } else {
                format = nil
            }
        }
        switch image.output {
        case .json:
            print((backingChain ? QemuJSON.array(layers) : layers[0]).rendered())
        case .human:
            print(layers.map(Self.human).joined(separator: "\n"), terminator: "")
        }
    }

    /// One layer, with qemu-img's JSON fields in its order.
    static func describe(_ node: BlockNode) -> QemuJSON {
        var info: [String: QemuJSON] = [
            "filename": .string(ImageSession.fileName(of: node)),
            "format": .string(node.formatName),
            "virtual-size": .int(node.length),
            "actual-size": .int(ImageSession.allocatedBytes(of: node)),
            "dirty-flag": .bool(false),
        ]
        guard let qcow2 = node.driver as? QCOW2Driver else { return .object(info, order: QemuKeyOrder.imageInfo) }
        let header = qcow2.header
        info["cluster-size"] = .int(Int64(header.clusterSize))
        info["dirty-flag"] = .bool(header.incompatibleFeatures.contains(.dirty))
        var specific: [String: QemuJSON] = [
            "compat": .string(header.version == 2 ? "0.10" : "1.1"),
            "compression-type": .string(header.compressionType == .zstd ? "zstd" : "zlib"),
            "refcount-bits": .int(Int64(header.refcountBits)),
        ]
        if header.version >= 3 {
            specific["lazy-refcounts"] = .bool(header.compatibleFeatures.contains(.lazyRefcounts))
            specific["corrupt"] = .bool(header.incompatibleFeatures.contains(.corrupt))
            specific["extended-l2"] = .bool(header.hasExtendedL2)
            // With the feature bit but no name (qemu-img info needs none),
            // QEMU still reports whether the data file is raw.
            if let dataFile = header.dataFile { specific["data-file"] = .string(dataFile) }
            if header.incompatibleFeatures.contains(.externalDataFile) {
                specific["data-file-raw"] = .bool(header.autoclearFeatures.contains(.rawExternalData))
            }
        }
        let bitmaps = qcow2.bitmaps
        if !bitmaps.isEmpty {
            specific["bitmaps"] = .array(bitmaps.map { bitmap in
                let flags = (bitmap.inUse ? ["in-use"] : []) + (bitmap.auto ? ["auto"] : [])
                return .object(["flags": .array(flags.map { .string($0) }), "name": .string(bitmap.name),
                                "granularity": .uint(bitmap.granularity)], order: QemuKeyOrder.bitmap)
            })
        }
        info["format-specific"] = .object(["type": .string("qcow2"),
                                           "data": .object(specific, order: QemuKeyOrder.qcow2Specific)],
                                          order: QemuKeyOrder.formatSpecific)
        if let backing = header.backingFile {
            info["backing-filename"] = .string(backing)
            let directory = ImageOpener.directory(of: ImageSession.fileName(of: node))
            info["full-backing-filename"] = .string(ImageOpener.resolve(backing, relativeTo: directory))
            if let format = header.backingFormat { info["backing-filename-format"] = .string(format) }
        }
        if !qcow2.snapshots.isEmpty {
            info["snapshots"] = .array(qcow2.snapshots.map { snapshot in
                var fields: [String: QemuJSON] = [
                    "id": .string(snapshot.id), "name": .string(snapshot.name),
                    "vm-state-size": .int(Int64(bitPattern: snapshot.vmStateSize)),
                    "date-sec": .uint(UInt64(snapshot.dateSeconds)), "date-nsec": .uint(UInt64(snapshot.dateNanoseconds)),
                    "vm-clock-sec": .uint(snapshot.vmClockNanoseconds / 1_000_000_000),
                    "vm-clock-nsec": .uint(snapshot.vmClockNanoseconds % 1_000_000_000),
                ]
                if let icount = snapshot.icount { fields["icount"] = .int(Int64(bitPattern: icount)) }
                return .object(fields, order: QemuKeyOrder.snapshot)
            })
        }
        return .object(info, order: QemuKeyOrder.imageInfo)
    }

    static func human(_ info: QemuJSON) -> String {
        func text(_ key: String) -> String? { if case .string(let value)? = info[key] { value } else { nil } }
        func number(_ key: String) -> Int64 { if case .int(let value)? = info[key] { value } else { 0 } }
        var lines = [
            "image: \(text("filename") ?? "")",
            "file format: \(text("format") ?? "")",
            "virtual size: \(ImageSize.human(number("virtual-size"))) (\(number("virtual-size")) bytes)",
            "disk size: \(ImageSize.human(number("actual-size")))",
        ]
        if info["cluster-size"] != nil { lines.append("cluster_size: \(number("cluster-size"))") }
        if case .bool(true)? = info["dirty-flag"] { lines.append("cleanly shut down: no") }
        if let backing = text("backing-filename") {
            let full = text("full-backing-filename") ?? backing
            lines.append("backing file: \(backing)" + (full == backing ? "" : " (actual path: \(full))"))
        }
        if let format = text("backing-filename-format") { lines.append("backing file format: \(format)") }
        if case .array(let snapshots)? = info["snapshots"] {
            lines.append("Snapshot list:")
            lines.append(snapshotLine("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"))
            for snapshot in snapshots { lines.append(snapshotLine(snapshot)) }
        }
        if let data = info["format-specific"]?["data"] {
            lines.append("Format specific information:")
            lines += data.humanLines(level: 1)
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// A row of qemu-img's snapshot table: columns padded by bytes, as
    /// its printf does, and never cut.
    static func snapshotLine(_ id: String, _ name: String, _ size: String, _ date: String, _ clock: String,
                             _ icount: String) -> String {
        func left(_ text: String, _ width: Int) -> String { text + String(repeating: " ", count: max(0, width - text.utf8.count)) }
        func right(_ text: String, _ width: Int) -> String { String(repeating: " ", count: max(0, width - text.utf8.count)) + text }
        return left(id, 9) + " " + left(name, 16) + " " + right(size, 8) + right(date, 20) + right(clock, 13) + right(icount, 11)
    }

    /// A snapshot's date in local time, as qemu-img prints it (strftime
    /// "%Y-%m-%d %H:%M:%S" of localtime).
    static func localDateAndTime(secondsSinceEpoch seconds: UInt64) -> String {
        var time = time_t(clamping: seconds)
        var parts = tm()
        guard localtime_r(&time, &parts) != nil else { return "" }
        var buffer = [CChar](repeating: 0, count: 64)
        let count = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S", &parts)
        return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func snapshotLine(_ snapshot: QemuJSON) -> String {
        func value(_ key: String) -> UInt64 {
            switch snapshot[key] {
            case .uint(let value)?: value
            case .int(let value)?: UInt64(bitPattern: value)
            default: 0
            }
        }
        func text(_ key: String) -> String { if case .string(let value)? = snapshot[key] { value } else { "" } }
        let date = localDateAndTime(secondsSinceEpoch: value("date-sec"))
        let seconds = value("vm-clock-sec")
        let clock = String(printf: "%02llu:%02llu:%02llu.%03llu", seconds / 3600, seconds / 60 % 60, seconds % 60,
                           value("vm-clock-nsec") / 1_000_000 % 1000)
        let icount = snapshot["icount"] == nil ? "" : String(value("icount"))
        return snapshotLine(text("id"), text("name"), ImageSize.human(Int64(bitPattern: value("vm-state-size"))),
                            date, clock, icount)
    }
}
