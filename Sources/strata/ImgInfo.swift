import ArgumentParser
import BlockDrivers
import BlockLayer
import Foundation
import NIOCore
import QCOW2

/// `strata img info`: qemu-img info's fields, human or JSON.
struct ImgInfo: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "info", abstract: "Show what an image is.")

    @OptionGroup var image: ImageArguments

    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain.")
    var backingChain = false


    func run() throws {
        let layers: [[String: Any]]
        do {
            // As qemu-img info: the backing chain is opened only to be shown.
            layers = try ImageSession().withImage(image.filename, format: image.format, forceShare: image.forceShare,
                                                  openBacking: backingChain) { node in
                let nodes = backingChain ? ImageSession.chain(from: node) : [node]
                return node.eventLoop.makeSucceededFuture(nodes.map(Self.describe))
            }
        } catch {
            fail("Could not open '\(image.filename)': \((error as? BlockError)?.description ?? "\(error)")")
        }
        switch image.output {
        case .json:
            let object: Any = backingChain ? layers : layers[0]
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        case .human:
            print(layers.map(Self.human).joined(separator: "\n"), terminator: "")
        }
    }

    /// One layer, with qemu-img's JSON field names.
    static func describe(_ node: BlockNode) -> [String: Any] {
        var info: [String: Any] = [
            "filename": ImageSession.fileName(of: node),
            "format": node.formatName,
            "virtual-size": node.length,
            "actual-size": ImageSession.allocatedBytes(of: node),
            "dirty-flag": false,
        ]
        guard let qcow2 = node.driver as? QCOW2Driver else { return info }
        let header = qcow2.header
        info["cluster-size"] = header.clusterSize
        info["dirty-flag"] = header.incompatibleFeatures.contains(.dirty)
        var specific: [String: Any] = [
            "compat": header.version == 2 ? "0.10" : "1.1",
            "refcount-bits": header.refcountBits,
        ]
        if header.version >= 3 {
            specific["compression-type"] = header.compressionType == .zstd ? "zstd" : "zlib"
            specific["lazy-refcounts"] = header.compatibleFeatures.contains(.lazyRefcounts)
            specific["corrupt"] = header.incompatibleFeatures.contains(.corrupt)
            specific["extended-l2"] = header.hasExtendedL2
            if let dataFile = header.dataFile {
                specific["data-file"] = dataFile
                specific["data-file-raw"] = header.autoclearFeatures.contains(.rawExternalData)
            }
        }
        info["format-specific"] = ["type": "qcow2", "data": specific]
        if let backing = header.backingFile {
            info["backing-filename"] = backing
            let directory = (ImageSession.fileName(of: node) as NSString).deletingLastPathComponent
            info["full-backing-filename"] = ImageOpener.resolve(backing, relativeTo: directory)
            if let format = header.backingFormat { info["backing-filename-format"] = format }
        }
        if !qcow2.snapshots.isEmpty {
            info["snapshots"] = qcow2.snapshots.map { snapshot -> [String: Any] in
                [
                    "id": snapshot.id, "name": snapshot.name,
                    "vm-state-size": snapshot.vmStateSize,
                    "date-sec": snapshot.dateSeconds, "date-nsec": snapshot.dateNanoseconds,
                    "vm-clock-sec": snapshot.vmClockNanoseconds / 1_000_000_000,
                    "vm-clock-nsec": snapshot.vmClockNanoseconds % 1_000_000_000,
                    "icount": 0,
                ]
            }
        }
        return info
    }

    static func human(_ info: [String: Any]) -> String {
        var lines = [
            "image: \(info["filename"] as? String ?? "")",
            "file format: \(info["format"] as? String ?? "")",
            "virtual size: \(ImageSize.human(info["virtual-size"] as? Int64 ?? 0)) (\(info["virtual-size"] as? Int64 ?? 0) bytes)",
            "disk size: \(ImageSize.human(info["actual-size"] as? Int64 ?? 0))",
        ]
        if let cluster = info["cluster-size"] as? Int { lines.append("cluster_size: \(cluster)") }
        if let backing = info["backing-filename"] as? String { lines.append("backing file: \(backing)") }
        if let format = info["backing-filename-format"] as? String { lines.append("backing file format: \(format)") }
        if let snapshots = info["snapshots"] as? [[String: Any]] {
            lines.append("Snapshot list:")
            lines.append("ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT")
            for snapshot in snapshots {
                let date = Date(timeIntervalSince1970: TimeInterval(snapshot["date-sec"] as? UInt32 ?? 0))
                let formatter = DateFormatter()
                formatter.dateFormat = "yyyy-MM-dd HH:mm:ss"
                let id = (snapshot["id"] as? String ?? "").padding(toLength: 10, withPad: " ", startingAt: 0)
                let name = (snapshot["name"] as? String ?? "").padding(toLength: 18, withPad: " ", startingAt: 0)
                let size = ImageSize.human(Int64(clamping: snapshot["vm-state-size"] as? UInt64 ?? 0))
                lines.append("\(id)\(name)\(String(repeating: " ", count: max(0, 6 - size.count)))\(size) \(formatter.string(from: date)) 00:00:00.000          0")
            }
        }
        if let specific = info["format-specific"] as? [String: Any], let data = specific["data"] as? [String: Any] {
            lines.append("Format specific information:")
            for key in ["compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2",
                        "data-file", "data-file-raw"] {
                if let value = data[key] { lines.append("    \(key.replacingOccurrences(of: "-", with: " ")): \(value)") }
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }
}
