import ArgumentParser
import BlockDrivers
import BlockLayer
import FoundationEssentials
import Glibc
import NBDServer
import NIOCore
import NIOPosix

/// `strata serve`: qemu-nbd's command line, same options and defaults.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Export a disk image over NBD (qemu-nbd compatible).",
        discussion: """
            Options and defaults are qemu-nbd's: without -k or -p the server listens on \
            TCP port 10809 on all addresses; without -t it exits when the last client leaves.
            """
    )

    @Argument(help: "The image to serve.")
    var filename: String

    @Option(name: [.customShort("f"), .long], help: "Image format (raw); probed when omitted.")
    var format: String?

    @Option(name: [.customShort("k"), .long], help: "Listen on this unix socket path.")
    var socket: String?

    @Option(name: [.customShort("p"), .long], help: "TCP port to listen on (default 10809).")
    var port: Int?

    @Option(name: [.customShort("b"), .long], help: "Address to listen on (default 0.0.0.0).")
    var bind: String?

    @Option(name: [.customShort("l"), .customLong("load-snapshot")],
            help: "Serve a qcow2 internal snapshot read-only: NAME, or snapshot.id=ID / snapshot.name=NAME.")
    var loadSnapshot: String?

    @Flag(name: [.customShort("s"), .long],
          help: "Leave the image unchanged: writes go to a temporary qcow2 overlay in $TMPDIR (default /var/tmp), deleted when the server ends.")
    var snapshot = false

    @Option(name: [.customShort("o"), .long], help: "Serve the image from this byte offset on.")
    var offset: Int64 = 0

    @Option(name: [.customShort("x"), .customLong("export-name")], help: "Export name (default empty).")
    var exportName: String = ""

    @Option(name: [.customShort("D"), .long], help: "Export description.")
    var description: String = ""

    @Flag(name: [.customShort("r"), .customLong("read-only")], help: "Export read-only.")
    var readOnly = false

    @Flag(name: [.customShort("t"), .long], help: "Keep serving after the last client disconnects.")
    var persistent = false

    @Option(name: [.customShort("e"), .long], help: "Clients served at once; 0 for no limit.")
    var shared: Int = 1

    @Option(help: "Cache mode.")
    var cache: CacheMode = .writeback

    @Flag(name: [.customShort("n"), .customLong("nocache")], help: "Same as --cache=none.")
    var nocache = false

    @Option(help: "AIO mode: threads, native (Linux AIO, needs --cache=none or directsync) or io_uring (Linux 5.12+).")
    var aio: FileAIOMode = .threads

    @Option(help: "Discard mode: ignore|off or unmap|on.")
    var discard: DiscardArgument = DiscardArgument(argument: "ignore")!

    @Option(name: .customLong("detect-zeroes"), help: "Turn all-zero writes into write-zeroes.")
    var detectZeroes: DetectZeroesMode = .off

    @Flag(name: [.customShort("A"), .customLong("allocation-depth")], help: "Expose qemu:allocation-depth.")
    var allocationDepth = false

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Open the image shared, even if another process uses it (needs -r).")
    var forceShare = false

    @Flag(help: "Fork off the server once it is listening.")
    var fork = false

    @Option(name: .customLong("pid-file"), help: "Write the server's process id to this file.")
    var pidFile: String?

    @Option(name: .customLong("handshake-limit"), help: "Seconds a client may take to negotiate (0: no limit).")
    var handshakeLimit: Int = 10

    @Option(name: .customLong("shutdown-limit"),
            help: "Seconds a shutdown waits for clients to take their last replies before closing them (0: no limit).")
    var shutdownLimit: Int = 10

    @Option(name: .customLong("l2-cache-size"),
            help: "qcow2 L2 cache in bytes (k, M suffixes); default: enough for the whole image, at most 32 MiB.")
    var l2CacheSize: String?

    @Option(name: .customLong("aio-max-batch"),
            help: "Most requests one io_submit (--aio=native) or io_uring_enter (--aio=io_uring) passes, as QEMU's aio-max-batch (default 1: measured fastest on virtio disks).")
    var aioMaxBatch: Int = LinuxAIOEngine.defaultMaxBatch

    @Option(name: .customLong("poll-max-ns"),
            help: "Nanoseconds the server keeps polling for the next request after sending replies, instead of sleeping, as QEMU's iothread poll-max-ns (default 0: never poll).")
    var pollMaxNs: Int = 0

    @Flag(name: [.customShort("v"), .long], help: "Log connections and errors to stderr.")
    var verbose = false

    /// The snapshot named by `-l`, in either of qemu-nbd's spellings.
    var snapshotReference: SnapshotReference? {
        loadSnapshot.flatMap(SnapshotReference.init(parsing:))
    }

    mutating func validate() throws {
        if nocache { cache = .none }
        // qemu-nbd -l exports the snapshot read-only.
        if loadSnapshot != nil { readOnly = true }
        // As qemu-nbd: a relative path would depend on where the server
        // happened to be started.
        if let socket, !socket.hasPrefix("/") {
            throw ValidationError("--socket (-k): socket path must be absolute: '\(socket)'")
        }
        if socket != nil, port != nil || bind != nil {
            throw ValidationError("--socket (-k) cannot be combined with --port (-p) or --bind (-b)")
        }
        if let port, !(1...65535).contains(port) {
            throw ValidationError("Invalid port '\(port)' for --port (-p): expected 1 to 65535")
        }
        if shared < 0 {
            throw ValidationError("Invalid value '\(shared)' for --shared (-e): expected 0 (no limit) or more")
        }
        if forceShare, !readOnly {
            throw ValidationError("--force-share (-U) requires --read-only (-r)")
        }
        if aio == .native, !cache.direct {
            throw ValidationError("--aio=native requires --cache=none or --cache=directsync (O_DIRECT)")
        }
        if detectZeroes == .unmap, discard.mode != .unmap {
            throw ValidationError("setting --detect-zeroes to unmap is not allowed without setting --discard to unmap")
        }
        if let format, !ImageOpener.supportedFormats.contains(format) {
            throw ValidationError("Invalid value '\(format)' for --format (-f): supported formats are \(ImageOpener.supportedFormats.joined(separator: ", "))")
        }
        if exportName.utf8.count > 4096 {
            throw ValidationError("--export-name (-x) is longer than 4096 bytes")
        }
        if let loadSnapshot, SnapshotReference(parsing: loadSnapshot) == nil {
            throw ValidationError("Failed in parsing snapshot param '\(loadSnapshot)': expected NAME, or snapshot.id=ID and/or snapshot.name=NAME")
        }
        if description.utf8.count > 4096 {
            throw ValidationError("--description (-D) is longer than 4096 bytes")
        }
        if snapshot, loadSnapshot != nil {
            throw ValidationError("--snapshot (-s) cannot be combined with --load-snapshot (-l)")
        }
        if snapshot, offset != 0 {
            throw ValidationError("--snapshot (-s) cannot be combined with --offset (-o)")
        }
        if offset < 0 {
            throw ValidationError("Invalid value '\(offset)' for --offset (-o): expected 0 or more")
        }
        if let l2CacheSize, ImageSize.parse(l2CacheSize) == nil {
            throw ValidationError("Invalid value '\(l2CacheSize)' for --l2-cache-size: expected bytes, with k, M or G")
        }
        if aioMaxBatch < 1 {
            throw ValidationError("Invalid value '\(aioMaxBatch)' for --aio-max-batch: expected a number of requests, 1 or more")
        }
        if pollMaxNs < 0 {
            throw ValidationError("Invalid value '\(pollMaxNs)' for --poll-max-ns: expected nanoseconds, 0 or more")
        }
        if handshakeLimit < 0 {
            throw ValidationError("Invalid value '\(handshakeLimit)' for --handshake-limit: expected seconds, 0 or more")
        }
        if shutdownLimit < 0 {
            throw ValidationError("Invalid value '\(shutdownLimit)' for --shutdown-limit: expected seconds, 0 or more")
        }
    }

    func run() throws {
        if fork, !Daemon.isChild {
            // The child is a new process, which LISTEN_PID does not name:
            // it would listen on the default TCP port instead.
            if SocketActivation.isActive {
                ServerProcess.printError("--fork cannot be used with systemd socket activation (LISTEN_FDS)")
                throw ExitCode(1)
            }
            // The parent: start the real server and wait until it listens.
            throw ExitCode(Daemon.spawnChildAndWait())
        }
        let server = ServerProcess(options: self)
        let status = server.run()
        throw ExitCode(status)
    }
}
