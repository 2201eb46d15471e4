import Foundation
import Testing

/// `strata serve` as a user meets it: option errors, locks against QEMU's
/// tools, probing, --fork and --pid-file, clean shutdown.
@Suite struct ServeCommandTests {
    @Test(arguments: [
        (["--cache=bogus"], "--cache"),
        (["--aio=native"], "--aio=native requires"),
        (["--discard=maybe"], "--discard"),
        (["--detect-zeroes=unmap"], "--discard to unmap"),
        (["-U"], "--read-only"),
        (["-f", "vmdk"], "--format"),
        (["--shared=-1"], "--shared"),
        (["-k", "/tmp/x.sock", "-p", "1234"], "--socket"),
        (["-k", "relative.sock"], "socket path must be absolute"),
        (["--aio-max-batch=0"], "--aio-max-batch"),
        (["--poll-max-ns=-1"], "--poll-max-ns"),
        (["--shutdown-limit=-1"], "--shutdown-limit"),
        (["-s", "-l", "snap"], "--load-snapshot"),
        (["-l", "snapshot.bogus=1"], "Failed in parsing snapshot param"),
        (["-D", String(repeating: "d", count: 4097)], "--description"),
        (["-s", "-o", "512"], "--offset"),
    ])
    func badOptionsNameTheOption(arguments: [String], mentions: String) throws {
        let result = try Harness.run(Harness.strata, ["serve"] + arguments + ["/nonexistent.raw"])
        #expect(result.status == 1, "usage errors exit 1, as in qemu-nbd")
        #expect(result.stderr.contains(mentions), "stderr: \(result.stderr)")
    }

    /// `-l` as qemu-nbd reads it: a bare argument is an id, else a name;
    /// `snapshot.id=` and `snapshot.name=` each match only their own field,
    /// and both given must both match. A raw image has no snapshots.
    @Test func loadSnapshotPicksTheSnapshotQemuNbdPicks() throws {
        let directory = try Harness.temporaryDirectory("load-snapshot")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("s.qcow2").path
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", image, "1M"]).status == 0)
        // Snapshot id 1 is named "2", id 2 is named "foo".
        for (pattern, name) in [(1, "2"), (2, "foo")] {
            #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P \(pattern) 0 64k", image]).status == 0)
            #expect(try Harness.run("/usr/bin/qemu-img", ["snapshot", "-c", name, image]).status == 0)
        }
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 3 0 64k", image]).status == 0)
        let copy = directory.appendingPathComponent("copy.raw").path
        for (argument, pattern) in [("2", 2), ("foo", 2), ("snapshot.name=2", 1), ("snapshot.id=2", 2),
                                    ("snapshot.id=1,snapshot.name=2", 1)] {
            let served = try ServedImage(image: image, options: ["-f", "qcow2", "-l", argument], directory: directory)
            let copied = try Harness.run("/usr/bin/nbdcopy", [served.uri, copy])
            #expect(copied.status == 0, "-l \(argument): \(copied.stderr)")
            #expect(served.stop() == 0)
            try? FileManager.default.removeItem(atPath: served.socket)
            let first = try FileHandle(forReadingFrom: URL(fileURLWithPath: copy)).read(upToCount: 1)
            #expect(first == Data([UInt8(pattern)]), "-l \(argument)")
        }
        let mismatched = try Harness.run(Harness.strata, ["serve", "-f", "qcow2", "-k", directory.path + "/m.sock",
                                                          "-l", "snapshot.id=1,snapshot.name=foo", image])
        #expect(mismatched.status == 1)
        #expect(mismatched.stderr.contains("Can't find snapshot"), "\(mismatched.stderr)")
        let raw = try Harness.makeImage(in: directory)
        let refused = try Harness.run(Harness.strata, ["serve", "-f", "raw", "-k", directory.path + "/r.sock", "-l", "x", raw])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("does not support internal snapshots"), "\(refused.stderr)")
    }

    /// qemu-nbd takes `--cache=off` for none (O_DIRECT).
    @Test func cacheOffIsCacheNone() throws {
        let directory = try Harness.temporaryDirectory("cache-off")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let served = try ServedImage(image: image, options: ["-f", "raw", "--cache=off", "--aio=native"], directory: directory)
        #expect(try Harness.waitForSize(served.uri) == "16777216")
        #expect(served.stop() == 0)
    }

    @Test func snapshotOfAMissingImageIsAClearErrorAndLeavesNothing() throws {
        let directory = try Harness.temporaryDirectory("snapshot")
        defer { try? FileManager.default.removeItem(at: directory) }
        let result = try Harness.run(Harness.strata, ["serve", "-s", "-f", "raw", "-k", directory.path + "/s.sock",
                                                      "/nonexistent/disk.raw"],
                                     environment: ["TMPDIR": directory.path])
        #expect(result.status == 1)
        #expect(result.stderr.contains("Could not open '/nonexistent/disk.raw': No such file or directory"), "\(result.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty)
    }

    @Test func missingImageIsAClearError() throws {
        let result = try Harness.run(Harness.strata, ["serve", "-f", "raw", "-k", "/tmp/strata-none.sock",
                                                      "/nonexistent/disk.raw"])
        #expect(result.status == 1)
        #expect(result.stderr.contains("Could not open '/nonexistent/disk.raw': No such file or directory"))
    }

    @Test func qemuImgResizeIsRefusedWhileServing() throws {
        let directory = try Harness.temporaryDirectory("lock")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let served = try ServedImage(image: image, options: ["-f", "raw"], directory: directory)
        let resize = try Harness.run("/usr/bin/qemu-img", ["resize", "-f", "raw", image, "32M"])
        #expect(resize.status != 0)
        #expect(resize.stderr.contains("Is another process using the image"), "\(resize.stderr)")
        #expect(served.stop() == 0)
        let after = try Harness.run("/usr/bin/qemu-img", ["resize", "-f", "raw", image, "32M"])
        #expect(after.status == 0, "locks are released on exit: \(after.stderr)")
    }

    @Test func aSecondServerCoexistsAsWithQemuNbd() throws {
        // A second Strata wants nothing QEMU would refuse, so it starts, as a
        // second qemu-nbd does; with -U it refuses nothing to anyone.
        let directory = try Harness.temporaryDirectory("lock2")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let first = try ServedImage(image: image, options: ["-f", "raw"], directory: directory)
        defer { first.stop() }
        let otherDirectory = try Harness.temporaryDirectory("lock2b")
        defer { try? FileManager.default.removeItem(at: otherDirectory) }
        let second = try ServedImage(image: image, options: ["-f", "raw", "-r", "-U"], directory: otherDirectory)
        let info = try Harness.run("/usr/bin/nbdinfo", ["--size", second.uri])
        #expect(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "16777216")
        second.stop()
    }

    /// The image lock bytes (OFD locks in /proc/locks) an image holder
    /// takes, as "start-end" ranges.
    static func lockRanges(of image: String) throws -> Set<String> {
        let inode = try FileManager.default.attributesOfItem(atPath: image)[.systemFileNumber] as? UInt64 ?? 0
        let locks = try String(contentsOfFile: "/proc/locks", encoding: .utf8)
        var ranges: Set<String> = []
        for line in locks.split(separator: "\n") where line.contains("OFDLCK") && line.contains(":\(inode) ") {
            let fields = line.split(separator: " ")
            ranges.insert("\(fields[fields.count - 2])-\(fields[fields.count - 1])")
        }
        return ranges
    }

    /// `-U` holds what `qemu-img -U` holds: the lock that says it reads, and
    /// none that would refuse anything to others; so it serves an image a
    /// writer has open, and the writer keeps it.
    @Test func forceShareLocksAsQemuDoes() throws {
        let directory = try Harness.temporaryDirectory("forceshare")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("disk.qcow2").path
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-f", "qcow2", image, "16M"]).status == 0)
        let qemu = Process()
        qemu.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
        qemu.arguments = ["-r", "-U", "-f", "qcow2", "-c", "sleep 5000", image]
        qemu.standardOutput = FileHandle.nullDevice
        try qemu.run()
        usleep(500_000)
        let theirs = try Self.lockRanges(of: image)
        kill(qemu.processIdentifier, SIGKILL)
        qemu.waitUntilExit()
        #expect(!theirs.isEmpty)

        let served = try ServedImage(image: image, options: ["-f", "qcow2", "-r", "-U"], directory: directory)
        defer { served.stop() }
        #expect(try Self.lockRanges(of: image) == theirs)
        let write = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 7 0 64k", image])
        #expect(write.status == 0, "a writer opens the image while -U serves it: \(write.stderr)")
    }

    @Test func probedRawRefusesWritingAnotherFormatsHeader() throws {
        let directory = try Harness.temporaryDirectory("probe")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let served = try ServedImage(image: image, options: [], directory: directory)
        defer { served.stop() }
        // "QFI\xfb" and version 3 at offset 0 would make the image probe as qcow2.
        let header = directory.appendingPathComponent("header").path
        try Data([0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3] + [UInt8](repeating: 0, count: 504)).write(to: URL(fileURLWithPath: header))
        let copy = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x51 0 1", served.uri])
        #expect(copy.status == 0, "a single byte that still probes raw is fine: \(copy.stderr)")
        let qcow = try Harness.run("/usr/bin/nbdcopy", [header, served.uri])
        #expect(qcow.status != 0, "writing a qcow2 magic to sector 0 must fail")
        let elsewhere = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x51 4096 512", served.uri])
        #expect(elsewhere.status == 0, "\(elsewhere.stderr)")
    }

    @Test func forkWritesPidFileAndSigtermShutsDownCleanly() throws {
        let directory = try Harness.temporaryDirectory("fork")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let socket = directory.appendingPathComponent("s.sock").path
        let pidFile = directory.appendingPathComponent("strata.pid").path
        let started = try Harness.run(Harness.strata, ["serve", "--fork", "--pid-file", pidFile, "-t", "-f", "raw",
                                                       "-k", socket, image], timeout: 30)
        #expect(started.status == 0, "\(started.stderr)")
        #expect(FileManager.default.fileExists(atPath: socket), "--fork returns once the socket listens")
        let pidText = try String(contentsOfFile: pidFile, encoding: .utf8)
        let pid = try #require(Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)))
        defer { kill(pid, SIGKILL) }
        var pidFileStatus = stat()
        #expect(stat(pidFile, &pidFileStatus) == 0 && pidFileStatus.st_mode & 0o777 == 0o600,
                "the pid file is the server's alone, as qemu-nbd's")
        let write = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 1M",
                                                         "nbd+unix:///?socket=\(socket)"])
        #expect(write.status == 0, "\(write.stderr)")
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(10)
        while kill(pid, 0) == 0, Date() < deadline { usleep(20_000) }
        #expect(kill(pid, 0) != 0, "the server exits on SIGTERM")
        #expect(!FileManager.default.fileExists(atPath: socket), "the socket is removed")
        #expect(!FileManager.default.fileExists(atPath: pidFile), "the pid file is removed")
        let check = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "read -P 0x77 0 1M", image])
        #expect(check.status == 0 && !check.stdout.contains("Pattern verification failed"), "\(check.stdout)")
    }

    /// A `--fork` server that cannot start: the parent exits 1 once the
    /// child has died, the child's error on its stderr; no pid file or
    /// socket is left, and the pid file's temporary name is gone too.
    @Test func forkOfAServerThatCannotStartExitsOne() throws {
        let directory = try Harness.temporaryDirectory("fork-fail")
        defer { try? FileManager.default.removeItem(at: directory) }
        let missing = directory.appendingPathComponent("missing.raw").path
        let socket = directory.appendingPathComponent("s.sock").path
        let pidFile = directory.appendingPathComponent("strata.pid").path
        let started = try Harness.run(Harness.strata, ["serve", "--fork", "--pid-file", pidFile, "-f", "raw",
                                                       "-k", socket, missing], timeout: 30)
        #expect(started.status == 1)
        #expect(started.stderr.contains("missing.raw"), "\(started.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory.path).isEmpty)
    }

    /// SIGINT (Ctrl-C) ends the server as SIGTERM does: what clients wrote
    /// to a qcow2 image, metadata included, is on disk; -v said what happened.
    @Test func sigintShutsDownCleanlyAndVerboseLogsIt() throws {
        let directory = try Harness.temporaryDirectory("sigint")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("disk.qcow2").path
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-f", "qcow2", image, "16M"]).status == 0)
        let served = try ServedImage(image: image, options: ["-f", "qcow2", "-v"], directory: directory)
        let write = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x3c 1M 2M", served.uri])
        #expect(write.status == 0, "\(write.stderr)")
        #expect(served.stop(signal: SIGINT) == 0)
        #expect(!FileManager.default.fileExists(atPath: served.socket), "the socket is removed")
        let log = served.errors()
        #expect(log.contains("client entered transmission"), "\(log)")
        #expect(log.contains("shutting down"), "\(log)")
        #expect(try Harness.run("/usr/bin/qemu-img", ["check", image]).status == 0)
        let check = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "read -P 0x3c 1M 2M", image])
        #expect(check.status == 0 && !check.stdout.contains("Pattern verification failed"), "\(check.stdout)")
    }

    @Test func serverSurvivesAbruptClientsAndKeepsServing() throws {
        let directory = try Harness.temporaryDirectory("abrupt")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let served = try ServedImage(image: image, options: ["-f", "raw", "-e", "0"], directory: directory)
        defer { served.stop() }
        // Clients killed mid-transfer.
        for _ in 0..<3 {
            let copy = Process()
            copy.executableURL = URL(fileURLWithPath: "/usr/bin/nbdcopy")
            copy.arguments = [served.uri, "null:"]
            try copy.run()
            usleep(30_000)
            kill(copy.processIdentifier, SIGKILL)
            copy.waitUntilExit()
        }
        let info = try Harness.run("/usr/bin/nbdinfo", ["--size", served.uri])
        #expect(info.status == 0)
        #expect(served.process.isRunning)
    }

    @Test func qcow2ImageLocksRefuseQemuAndAreRefusedByIt() throws {
        let directory = try Harness.temporaryDirectory("qlock")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("locked.qcow2").path
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-f", "qcow2", image, "16M"]).status == 0)
        // Strata writing: qemu-img may not even read (metadata may change).
        let served = try ServedImage(image: image, options: ["-f", "qcow2"], directory: directory)
        let info = try Harness.run("/usr/bin/qemu-img", ["info", image])
        #expect(info.status != 0 && info.stderr.contains("Is another process using the image"), "\(info.stderr)")
        #expect(served.stop() == 0)
        // QEMU writing: Strata refuses to open it for writing, and says why.
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
        holder.arguments = ["-f", "qcow2", "-c", "sleep 20000", image]
        holder.standardOutput = FileHandle.nullDevice
        try holder.run()
        defer { kill(holder.processIdentifier, SIGKILL); holder.waitUntilExit() }
        usleep(500_000)
        let refused = try Harness.run(Harness.strata, ["serve", "-f", "qcow2", "-k",
                                                       directory.appendingPathComponent("r.sock").path, image])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("lock") && refused.stderr.contains("Is another process using the image"),
                "\(refused.stderr)")
        // Read-only with -U shares everything and opens.
        let sharedDirectory = try Harness.temporaryDirectory("qlock-u")
        defer { try? FileManager.default.removeItem(at: sharedDirectory) }
        let shared = try ServedImage(image: image, options: ["-f", "qcow2", "-r", "-U"], directory: sharedDirectory)
        #expect(shared.stop() == 0)
    }
}
