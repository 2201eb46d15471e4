import ArgumentParser
import BlockDrivers
import CLinuxAIO
import Foundation
import QCOW2

/// `strata img create`: raw and qcow2 images, qemu-img's options.
struct ImgCreate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a new image.",
        discussion: """
            -o takes qemu-img's options: cluster_size, lazy_refcounts, extended_l2, compression_type, \
            refcount_bits, preallocation (off, metadata, falloc, full), compat (0.10, 1.1), data_file, \
            data_file_raw, backing_file, backing_fmt.
            """
    )

    @Option(name: .customShort("f"), help: "Image format: raw or qcow2.")
    var format: String = "raw"

    @Option(name: .customShort("b"), help: "Backing file (qcow2).")
    var backingFile: String?

    @Option(name: .customShort("F"), help: "Backing file format.")
    var backingFormat: String?

    @Option(name: .customShort("o"), help: "Format options, comma separated.")
    var options: [String] = []

    @Flag(name: .customShort("q"), help: "Quiet.")
    var quiet = false

    @Argument(help: "The image to create.")
    var filename: String

    @Argument(help: "Size, with k, M, G, T suffixes (optional with a backing file).")
    var size: String?

    func run() throws {
        guard ["raw", "qcow2"].contains(format) else {
            fail("Unknown file format '\(format)' (supported: raw, qcow2)")
        }
        var settings: [String: String] = [:]
        for chunk in options.flatMap({ $0.split(separator: ",") }) {
            let parts = chunk.split(separator: "=", maxSplits: 1).map(String.init)
            settings[parts[0]] = parts.count > 1 ? parts[1] : "on"
        }
        var backing = backingFile ?? settings.removeValue(forKey: "backing_file")
        let backingFmt = backingFormat ?? settings.removeValue(forKey: "backing_fmt")
        if backing?.isEmpty == true { backing = nil }
        var sizeText = size ?? settings.removeValue(forKey: "size")
        if sizeText == nil, let backing {
            guard let backingFmt else { fail("Backing file specified without backing format") }
            let directory = (filename as NSString).deletingLastPathComponent
            let path = backing.hasPrefix("/") || directory.isEmpty ? backing : directory + "/" + backing
            do {
                let virtual = try ImageSession().withImage(path, format: backingFmt, forceShare: true) { node in
                    node.eventLoop.makeSucceededFuture(node.length)
                }
                sizeText = String(virtual)
            } catch {
                fail("Could not open backing image '\(backing)': \(error)")
            }
        }
        guard let sizeText else { fail("Image creation needs a size parameter") }
        guard let bytes = ImageSize.parse(sizeText) else { fail(ImageSize.usage) }
        if format == "raw" {
            if backing != nil { fail("'raw' does not support backing files") }
            try createRaw(bytes: bytes, settings: settings)
        } else {
            if backing != nil, backingFmt == nil { fail("Backing file specified without backing format") }
            try createQCOW2(bytes: bytes, settings: settings, backing: backing, backingFormat: backingFmt)
        }
    }

    private func bool(_ value: String?, _ name: String) -> Bool {
        switch value {
        case nil, "off", "false": return false
        case "on", "true": return true
        default: fail("Parameter '\(name)' expects 'on' or 'off'")
        }
    }

    private func createRaw(bytes: UInt64, settings: [String: String]) throws {
        var settings = settings
        let preallocation = settings.removeValue(forKey: "preallocation") ?? "off"
        if let unknown = settings.keys.sorted().first { fail("Invalid parameter '\(unknown)'") }
        guard ["off", "falloc", "full"].contains(preallocation) else {
            fail("Invalid value '\(preallocation)' for preallocation: expected off, falloc or full")
        }
        if !quiet { print("Formatting '\(filename)', fmt=raw size=\(bytes)") }
        let fd = Glibc.open(filename, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { fail("\(filename): Could not create image: \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        guard ftruncate(fd, off_t(bytes)) == 0 else { fail("Could not resize file: \(String(cString: strerror(errno)))") }
        try preallocate(fd: fd, from: 0, to: bytes, mode: preallocation)
    }

    private func preallocate(fd: Int32, from start: UInt64, to end: UInt64, mode: String) throws {
        guard end > start else { return }
        switch mode {
        case "falloc":
            guard posix_fallocate(fd, off_t(start), off_t(end - start)) == 0 else {
                fail("Could not preallocate data for the new file")
            }
        case "full":
            let chunk = [UInt8](repeating: 0, count: 1 << 20)
            var position = start
            while position < end {
                let count = Int(min(UInt64(chunk.count), end - position))
                guard chunk.withUnsafeBytes({ pwrite(fd, $0.baseAddress, count, off_t(position)) }) == count else {
                    fail("Could not write zeroes for preallocation: \(String(cString: strerror(errno)))")
                }
                position += UInt64(count)
            }
        default:
            break
        }
    }

    private func createQCOW2(bytes: UInt64, settings: [String: String], backing: String?, backingFormat: String?) throws {
        var settings = settings
        var builder = QCOW2ImageBuilder.Options(size: bytes)
        builder.backingFile = backing
        builder.backingFormat = backingFormat
        if let value = settings.removeValue(forKey: "cluster_size") {
            guard let cluster = ImageSize.parse(value), cluster.nonzeroBitCount == 1 else {
                fail("Cluster size must be a power of two between 512 and 2048k")
            }
            builder.clusterBits = UInt32(cluster.trailingZeroBitCount)
        }
        builder.lazyRefcounts = bool(settings.removeValue(forKey: "lazy_refcounts"), "lazy_refcounts")
        builder.extendedL2 = bool(settings.removeValue(forKey: "extended_l2"), "extended_l2")
        switch settings.removeValue(forKey: "compression_type") ?? "zlib" {
        case "zlib": builder.compression = .zlib
        case "zstd": builder.compression = .zstd
        case let other: fail("Invalid value '\(other)' for compression_type: expected zlib or zstd")
        }
        if let value = settings.removeValue(forKey: "refcount_bits") {
            guard let bits = Int(value) else { fail("Invalid value '\(value)' for refcount_bits") }
            builder.refcountBits = bits
        }
        switch settings.removeValue(forKey: "compat") ?? "1.1" {
        case "0.10", "v2": builder.version = 2
        case "1.1", "v3": builder.version = 3
        case let other: fail("Invalid compatibility level: '\(other)'")
        }
        let preallocation = settings.removeValue(forKey: "preallocation") ?? "off"
        guard ["off", "metadata", "falloc", "full"].contains(preallocation) else {
            fail("Invalid value '\(preallocation)' for preallocation: expected off, metadata, falloc or full")
        }
        builder.preallocateMetadata = preallocation != "off"
        builder.dataFile = settings.removeValue(forKey: "data_file")
        builder.dataFileRaw = bool(settings.removeValue(forKey: "data_file_raw"), "data_file_raw")
        if let unknown = settings.keys.sorted().first { fail("Invalid parameter '\(unknown)'") }

        let layout: QCOW2ImageBuilder.Layout
        do {
            layout = try QCOW2ImageBuilder(options: builder).build()
        } catch {
            fail("\(filename): \(error)")
        }
        if !quiet {
            var line = "Formatting '\(filename)', fmt=qcow2 cluster_size=\(1 << builder.clusterBits)"
            if builder.version == 3 {
                line += " extended_l2=\(builder.extendedL2 ? "on" : "off") compression_type=\(builder.compression == .zstd ? "zstd" : "zlib")"
            }
            if preallocation != "off" { line += " preallocation=\(preallocation)" }
            line += " size=\(bytes)"
            if let backing { line += " backing_file=\(backing)" }
            if let backingFormat { line += " backing_fmt=\(backingFormat)" }
            if let dataFile = builder.dataFile {
                line += " data_file=\(dataFile)"
                if builder.dataFileRaw { line += " data_file_raw=on" }
            }
            if builder.version == 3 { line += " lazy_refcounts=\(builder.lazyRefcounts ? "on" : "off")" }
            line += " refcount_bits=\(builder.refcountBits)"
            print(line)
        }
        if let dataFile = builder.dataFile {
            // As qemu-img: a relative data file name is relative to the
            // current directory, when creating and when opening.
            let path = dataFile
            let fd = Glibc.open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard fd >= 0 else { fail("Could not create data file '\(path)': \(String(cString: strerror(errno)))") }
            defer { Glibc.close(fd) }
            guard ftruncate(fd, off_t(bytes)) == 0 else { fail("Could not resize the data file") }
            try preallocate(fd: fd, from: 0, to: bytes, mode: preallocation == "metadata" ? "off" : preallocation)
        }
        let fd = Glibc.open(filename, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { fail("\(filename): Could not create image: \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        do {
            try layout.write(to: fd)
        } catch {
            fail("\(error)")
        }
        if builder.dataFile == nil, preallocation == "falloc" || preallocation == "full" {
            // Data clusters follow the preallocated metadata.
            let dataStart = layout.fileLength - (bytes + UInt64(1 << builder.clusterBits) - 1) / UInt64(1 << builder.clusterBits) * UInt64(1 << builder.clusterBits)
            try preallocate(fd: fd, from: dataStart, to: layout.fileLength, mode: preallocation)
        }
        guard fsync(fd) == 0 else { fail("Could not sync the image: \(String(cString: strerror(errno)))") }
    }
}
