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

    @Option(name: [.customShort("f"), .customLong("format")], help: "Image format: raw or qcow2.")
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
        for list in options where !CreateOptions.isValidList(list) { fail("Invalid option list: \(list)") }
        // qemu-img reads the size on the command line first, then the rest.
        let commandLineSize = size.map { UInt64(ImageSize.argument($0, name: "image size")) }
        guard ["raw", "qcow2"].contains(format) else { fail("\(filename): Unknown file format '\(format)'") }
        var settings: CreateOptions
        do throws(CreateOptions.Failure) {
            settings = try CreateOptions(format: format, lists: options)
            if let commandLineSize {
                if settings.number("size") != nil { fail("\(filename): The image size must be specified only once") }
                try settings.set("size", String(commandLineSize))
            }
            if let backingFile {
                guard format == "qcow2" else { fail("\(filename): Backing file not supported for file format '\(format)'") }
                try settings.set("backing_file", backingFile)
            }
            if let backingFormat {
                guard format == "qcow2" else {
                    fail("\(filename): Backing file format not supported for file format '\(format)'")
                }
                try settings.set("backing_fmt", backingFormat)
            }
        } catch {
            fail("\(filename): \(error.message)", hint: error.hint)
        }
        let backing = settings.text("backing_file")
        let backingFmt = settings.text("backing_fmt")
        var requested = settings.number("size")
        if let backing {
            // qemu-img's checks, plus the same file under another name.
            let path = ImageOpener.resolve(backing, relativeTo: ImageOpener.directory(of: filename))
            if backing == filename || Self.sameFile(path, filename) {
                fail("\(filename): Error: Trying to create an image with the same filename as the backing file")
            }
            guard !backing.isEmpty else { fail("\(filename): Expected backing file name, got empty string") }
            if !unsafeBacking {
                // As qemu-img without -u: the backing file must open (its
                // format probed when not given, to name it in the error);
                // it gives the size when none is given.
                let opened: (length: Int64, format: String)
                do {
                    opened = try ImageSession().withImage(path, format: backingFmt, forceShare: true) { node in
                        node.eventLoop.makeSucceededFuture((node.length, node.formatName))
                    }
                } catch {
                    fail("\(filename): \(error)", hint: ["Could not open backing image."])
                }
                guard backingFmt != nil else {
                    fail("\(filename): Backing file specified without backing format",
                         hint: ["Detected format of \(opened.format)."])
                }
                if requested == nil {
                    requested = UInt64(opened.length)
                    try? settings.set("size", String(opened.length))
                }
            } else if backingFmt == nil {
                fail("\(filename): Backing file specified without backing format")
            }
        }
        guard let requested else { fail("\(filename): Image creation needs a size parameter") }
        // qemu-img's bounds, then its rounding up to whole 512-byte sectors.
        guard requested <= UInt64(Int64.max) - 511 else { fail(ImageSize.outOfRange("image size")) }
        let bytes = (requested + 511) / 512 * 512
        // As qemu-img, the line comes before the format checks the options.
        if !quiet {
            print(settings.formattingLine(filename: filename, format: format))
            fflush(stdout)  // before any error the checks print
        }
        if format == "raw" {
            try createRaw(bytes: bytes, settings: settings)
        } else {
            try createQCOW2(bytes: bytes, settings: settings)
        }
    }

    /// Whether two paths name one existing file (device and inode).
    private static func sameFile(_ first: String, _ second: String) -> Bool {
        var a = stat()
        var b = stat()
        guard stat(first, &a) == 0, stat(second, &b) == 0 else { return false }
        return a.st_dev == b.st_dev && a.st_ino == b.st_ino
    }

    /// `bytes` is the size rounded up to whole sectors.
    private func createRaw(bytes: UInt64, settings: CreateOptions) throws {
        let preallocation = settings.text("preallocation") ?? "off"
        switch preallocation {
        case "off", "falloc", "full": break
        case "metadata": fail("\(filename): Unsupported preallocation mode: metadata")
        default: fail("\(filename): invalid parameter value: \(preallocation)")
        }
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

    private func createQCOW2(bytes: UInt64, settings: CreateOptions) throws {
        var builder = QCOW2ImageBuilder.Options(size: bytes)
        builder.backingFile = settings.text("backing_file")
        builder.backingFormat = settings.text("backing_fmt")
        // QEMU reads these three as enumerations first, in this order.
        switch settings.text("compat") ?? "1.1" {
        case "0.10", "v2": builder.version = 2
        case "1.1", "v3": builder.version = 3
        case let other: fail("\(filename): Parameter 'version' does not accept value '\(other)'")
        }
        let preallocation = settings.text("preallocation") ?? "off"
        guard ["off", "metadata", "falloc", "full"].contains(preallocation) else {
            fail("\(filename): Parameter 'preallocation' does not accept value '\(preallocation)'")
        }
        switch settings.text("compression_type") ?? "zlib" {
        case "zlib": builder.compression = .zlib
        case "zstd": builder.compression = .zstd
        case let other: fail("\(filename): Parameter 'compression-type' does not accept value '\(other)'")
        }
        if let cluster = settings.number("cluster_size") {
            // 0 for no power of two, which the builder refuses in its turn.
            builder.clusterBits = cluster.nonzeroBitCount == 1 ? UInt32(cluster.trailingZeroBitCount) : 0
        }
        builder.lazyRefcounts = settings.flag("lazy_refcounts")
        builder.extendedL2 = settings.flag("extended_l2")
        if let text = settings.text("refcount_bits") {
            // QEMU reads it again here, as a signed integer (its option
            // parser took it as an unsigned one).
            errno = 0
            let width = strtoll(text, nil, 0)
            if errno == ERANGE { fail("\(filename): Parameter 'refcount-bits' expects integer") }
            builder.refcountBits = Int(width)
        }
        builder.preallocateMetadata = preallocation != "off"
        builder.dataFile = settings.text("data_file")
        builder.dataFileRaw = settings.flag("data_file_raw")

        let layout: QCOW2ImageBuilder.Layout
        do {
            layout = try QCOW2ImageBuilder(options: builder).build()
        } catch {
            fail("\(filename): \(error)")
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
