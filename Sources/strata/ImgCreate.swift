import ArgumentParser
import BlockDrivers
import CLinuxAIO
import FoundationEssentials
import Glibc
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

    @Flag(name: .customShort("u"), help: "Unsafe: do not open the backing file (its size is then needed).")
    var unsafeBacking = false

    @Argument(help: "The image to create.")
    var filename: String

    @Argument(help: "Size, with k, M, G, T suffixes (optional with a backing file).")
    var size: String?

    func run() throws {
        guard ["raw", "qcow2"].contains(format) else {
            fail("Unknown file format '\(format)' (supported: raw, qcow2)")
        }
        var settingsLeft = parseOptions(options)
        let backing = backingFile ?? settingsLeft.removeValue(forKey: "backing_file")
        let backingFmt = backingFormat ?? settingsLeft.removeValue(forKey: "backing_fmt")
        let sizeOption = settingsLeft.removeValue(forKey: "size")
        var sizeText = size ?? sizeOption
        if let backing {
            // qemu-img's checks, plus the same file under another name.
            guard !backing.isEmpty else { fail("\(filename): Expected backing file name, got empty string") }
            let path = ImageOpener.resolve(backing, relativeTo: ImageOpener.directory(of: filename))
            if backing == filename || Self.sameFile(path, filename) {
                fail("\(filename): Error: Trying to create an image with the same filename as the backing file")
            }
            if format == "qcow2", !unsafeBacking {
                // As qemu-img without -u: the backing file must open; it
                // gives the size when none is given.
                guard let backingFmt else { fail("Backing file specified without backing format") }
                do {
                    let virtual = try ImageSession().withImage(path, format: backingFmt, forceShare: true) { node in
                        node.eventLoop.makeSucceededFuture(node.length)
                    }
                    if sizeText == nil { sizeText = String(virtual) }
                } catch {
                    fail("Could not open backing image '\(backing)': \(error)")
                }
            }
        }
        guard let sizeText else { fail("Image creation needs a size parameter") }
        // qemu-img's bounds, then its rounding up to whole 512-byte sectors.
        let outOfRange = "Invalid image size specified. Must be between 0 and \(Int64.max)."
        let parsed: UInt64
        switch ImageSize.read(sizeText) {
        case .bytes(let bytes) where bytes <= UInt64(Int64.max) - 511: parsed = bytes
        case .bytes, .outOfRange: fail(outOfRange)
        case .invalid: fail(lines: ImageSize.usage)
        }
        // The command line's size read first, as qemu-img reads it.
        if size != nil, sizeOption != nil { fail("\(filename): The image size must be specified only once") }
        let bytes = (parsed + 511) / 512 * 512
        if format == "raw" {
            if backing != nil { fail("'raw' does not support backing files") }
            try createRaw(bytes: bytes, requested: parsed, settings: settingsLeft)
        } else {
            if backing != nil, backingFmt == nil { fail("Backing file specified without backing format") }
            try createQCOW2(bytes: bytes, requested: parsed, settings: settingsLeft, backing: backing,
                            backingFormat: backingFmt)
        }
    }

    /// `-o` options, as qemu-img reads them: `key=value` pairs separated by
    /// commas (`,,` is a comma within a value), a bare `key` meaning
    /// `key=on` and `nokey` `key=off`; an empty value stays empty (and is
    /// refused where one is needed).
    func parseOptions(_ options: [String]) -> [String: String] {
        var settings: [String: String] = [:]
        for option in options {
            guard !option.hasPrefix(",") else { fail("Invalid option list: \(option)") }
            for chunk in Self.splitOptionList(option) {
                guard !chunk.isEmpty else { fail("Invalid option list: \(option)") }
                guard let equals = chunk.firstIndex(of: "=") else {
                    if chunk.hasPrefix("no") { settings[String(chunk.dropFirst(2))] = "off" } else { settings[String(chunk)] = "on" }
                    continue
                }
                let key = String(chunk[..<equals])
                guard !key.isEmpty else { fail("\(filename): Invalid parameter ''") }
                settings[key] = String(chunk[chunk.index(after: equals)...])
            }
        }
        return settings
    }

    /// Splits at single commas; `,,` stands for a comma.
    static func splitOptionList(_ text: String) -> [Substring] {
        var chunks: [Substring] = []
        var current = ""
        var characters = text[...]
        while let character = characters.popFirst() {
            if character == "," {
                if characters.first == "," {
                    characters.removeFirst()
                    current.append(",")
                } else {
                    chunks.append(current[...])
                    current = ""
                }
            } else {
                current.append(character)
            }
        }
        chunks.append(current[...])
        return chunks
    }

    /// Whether two paths name one existing file (device and inode).
    private static func sameFile(_ first: String, _ second: String) -> Bool {
        var a = stat()
        var b = stat()
        guard stat(first, &a) == 0, stat(second, &b) == 0 else { return false }
        return a.st_dev == b.st_dev && a.st_ino == b.st_ino
    }

    private func bool(_ value: String?, _ name: String) -> Bool {
        switch value {
        // qemu's spellings of a boolean, case and all.
        case nil, "off", "false", "no", "n": return false
        case "on", "true", "yes", "y": return true
        default: fail("Parameter '\(name)' expects 'on' or 'off'")
        }
    }

    /// `bytes` is the size rounded up to whole sectors, `requested` the
    /// size asked for, which the "Formatting" line shows, as qemu-img's does.
    private func createRaw(bytes: UInt64, requested: UInt64, settings: [String: String]) throws {
        var settings = settings
        let preallocation = settings.removeValue(forKey: "preallocation") ?? "off"
        if let unknown = settings.keys.sorted().first { fail("Invalid parameter '\(unknown)'") }
        guard ["off", "falloc", "full"].contains(preallocation) else {
            fail("Invalid value '\(preallocation)' for preallocation: expected off, falloc or full")
        }
        if !quiet { print("Formatting '\(filename)', fmt=raw size=\(requested)") }
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

    private func createQCOW2(bytes: UInt64, requested: UInt64, settings: [String: String], backing: String?,
                             backingFormat: String?) throws {
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
            line += " size=\(requested)"
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
