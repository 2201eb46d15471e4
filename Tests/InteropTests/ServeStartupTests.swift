import Foundation
import Testing

/// How `strata serve` starts: socket activation checked as qemu-nbd checks
/// it, `--offset` on any format, a signal during a long open, and a pid
/// file that a failed second instance leaves alone.
@Suite struct ServeStartupTests {
    /// `sh -c 'LISTEN_PID=$$ exec strata serve ...'`, so LISTEN_PID names
    /// the server; fd 3 is whatever `fd3` redirects.
    func activated(_ arguments: [String], listenFDs: String, fd3: String = "</dev/null") throws -> Harness.Output {
        let command = (["exec", "3\(fd3)", ";", "LISTEN_PID=$$", "exec", Harness.strata, "serve"] + arguments)
            .joined(separator: " ")
        return try Harness.run("/bin/sh", ["-c", command], environment: ["LISTEN_FDS": listenFDs], timeout: 20)
    }

    /// More than one socket, a huge count (which trapped), no socket at
    /// fd 3, and `--fork` (whose child LISTEN_PID does not name, so it
    /// listened on 0.0.0.0:10809 instead) are refused before the image opens.
    @Test func socketActivationIsCheckedBeforeTheImageOpens() throws {
        let directory = try Harness.temporaryDirectory("activation")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let cases: [([String], String, String)] = [
            (["-f", "raw", image], "2", "LISTEN_FDS > 1 is not supported"),
            (["-f", "raw", image], "2147483647", "LISTEN_FDS > 1 is not supported"),
            (["-f", "raw", image], "1", "file descriptor 3 is not a socket"),
            (["--fork", "-f", "raw", image], "1", "--fork cannot be used with systemd socket activation"),
        ]
        for (arguments, count, message) in cases {
            let result = try activated(arguments, listenFDs: count)
            #expect(result.status == 1, "LISTEN_FDS=\(count) \(arguments): \(result.status) \(result.stderr)")
            #expect(result.stderr.contains(message), "\(result.stderr)")
        }
    }

    /// An image that cannot be opened is named first, as qemu-nbd names it:
    /// the error itself may be about a backing file further down.
    @Test func anImageThatCannotBeOpenedIsNamed() throws {
        let directory = try Harness.temporaryDirectory("openerror")
        defer { try? FileManager.default.removeItem(at: directory) }
        let junk = directory.appendingPathComponent("junk.qcow2").path
        let top = directory.appendingPathComponent("top.qcow2").path
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: junk))
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", "-b", junk, "-F", "qcow2", "-u",
                                                      top, "16M"]).status == 0)
        let socket = directory.appendingPathComponent("s.sock").path
        let result = try Harness.run(Harness.strata, ["serve", "-r", "-k", socket, top])
        #expect(result.status == 1)
        #expect(result.stderr == "strata: Could not open '\(top)': Could not open backing file: Image is not in qcow2 format\n",
                "\(result.stderr)")
    }

    /// qemu-nbd puts a raw node with the offset above any format; Strata
    /// ignored `--offset` for qcow2 and served the image from byte 0.
    @Test func offsetAppliesToQcow2AsInQemuNbd() throws {
        let directory = try Harness.temporaryDirectory("offset")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("disk.qcow2").path
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-f", "qcow2", image, "4M"]).status == 0)
        let written = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 1M",
                                                           "-c", "write -P 0x22 1M 1M", image])
        #expect(written.status == 0, "\(written.stderr)")
        let served = try ServedImage(image: image, options: ["-f", "qcow2", "-o", "1048576"], directory: directory)
        defer { served.stop() }
        #expect(try Harness.run("/usr/bin/nbdinfo", ["--size", served.uri]).stdout.hasPrefix("3145728"))
        let read = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-r", "-c", "read -P 0x22 0 1M",
                                                        "-c", "read -P 0 1M 2M", served.uri])
        #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"), "\(read.stdout)")
        // Unallocated clusters stay holes that read as zeroes, as through qemu-nbd.
        let map = try Harness.run("/usr/bin/nbdinfo", ["--map", served.uri])
        served.stop()
        let past = try Harness.run(Harness.strata, ["serve", "-k", served.socket, "-f", "qcow2", "-o", "5242880", image])
        #expect(past.status == 1)
        #expect(past.stderr.contains("Offset 5242880 is past the end of"), "\(past.stderr)")
        // What qemu-nbd -o 1048576 answers for the same image (checked by hand).
        let expected = "         0     1048576    0  data\n   1048576     2097152    3  hole,zero\n"
        #expect(map.stdout == expected, "\(map.stdout)")
    }

    /// Over a backing chain, qemu-nbd 7.2's `--offset` window reports the top
    /// layer alone: "hole" (not zero) and depth 0 where the backing file's
    /// data shows through. Strata reports what the window reads as; the raw
    /// window owns all of it, so its depth is 1 throughout.
    @Test func offsetOverAChainReportsWhatTheWindowReads() throws {
        let directory = try Harness.temporaryDirectory("offset-chain")
        defer { try? FileManager.default.removeItem(at: directory) }
        let base = directory.appendingPathComponent("base.qcow2").path
        let top = directory.appendingPathComponent("top.qcow2").path
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", base, "4M"]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M",
                                                     "-c", "write -P 2 2M 512k", base]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                                                      top]).status == 0)
        #expect(try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write -P 3 512k 1M",
                                                     "-c", "write -z 3M 64k", top]).status == 0)
        let served = try ServedImage(image: top, options: ["-f", "qcow2", "-r", "-A", "-o", "65536"],
                                     directory: directory)
        defer { served.stop() }
        let read = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-r", "-c", "read -P 1 0 448k",
                                                        "-c", "read -P 3 448k 1M", "-c", "read -P 0 1472k 512k",
                                                        "-c", "read -P 2 1984k 512k", "-c", "read -P 0 2496k 1536k",
                                                        served.uri])
        #expect(read.status == 0 && !read.stdout.contains("verification failed"), "\(read.stdout)")
        let map = try Harness.run("/usr/bin/nbdinfo", ["--map", served.uri])
        #expect(map.stdout == """
                     0     1507328    0  data
               1507328      524288    3  hole,zero
               2031616      524288    0  data
               2555904     1572864    3  hole,zero

            """, "\(map.stdout)")
        let depth = try Harness.run("/usr/bin/nbdinfo", ["--map=qemu:allocation-depth", served.uri])
        #expect(depth.stdout == "         0     4128768    1  local\n", "\(depth.stdout)")
    }

    /// SIGTERM while a dirty lazy-refcounts image is being repaired on
    /// open: the server finishes opening, then shuts down as usual (the
    /// image closed clean). It used to close the I/O under the open and
    /// hang for ever.
    @Test func aSignalDuringALongOpenEndsTheServerOnceTheImageIsOpen() throws {
        let directory = try Harness.temporaryDirectory("open-signal")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("dirty.qcow2").path
        let made = try Harness.run("/usr/bin/qemu-img", ["create", "-f", "qcow2", "-o",
            "lazy_refcounts=on,cluster_size=512,preallocation=metadata", image, "256M"])
        #expect(made.status == 0, "\(made.stderr)")
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: image))
        try handle.seek(toOffset: 79)
        try handle.write(contentsOf: [1])  // the dirty bit: the open repairs every refcount
        try handle.close()
        let socket = directory.appendingPathComponent("s.sock").path
        let server = Process()
        server.executableURL = URL(fileURLWithPath: Harness.strata)
        server.arguments = ["serve", "-t", "-k", socket, "-f", "qcow2", image]
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer { if server.isRunning { kill(server.processIdentifier, SIGKILL) } }
        // Wait until SIGTERM is caught (the handlers are up), not for a time.
        let status = "/proc/\(server.processIdentifier)/status"
        let caught = { () -> Bool in
            let text = (try? String(contentsOfFile: status, encoding: .utf8)) ?? ""
            guard let line = text.split(separator: "\n").first(where: { $0.hasPrefix("SigCgt:") }),
                  let mask = UInt64(line.dropFirst(7).trimmingCharacters(in: .whitespaces), radix: 16) else { return false }
            return mask & (1 << UInt64(SIGTERM - 1)) != 0
        }
        let handlersDeadline = Date().addingTimeInterval(20)
        while !caught(), server.isRunning, Date() < handlersDeadline { usleep(5_000) }
        try #require(caught(), "the server never caught SIGTERM")
        try #require(!FileManager.default.fileExists(atPath: socket),
                     "the image opened before the handlers were up: the signal would not land during the open")
        kill(server.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(60)
        while server.isRunning, Date() < deadline { usleep(20_000) }
        #expect(!server.isRunning, "the server exits once the open is done")
        server.waitUntilExit()
        #expect(server.terminationStatus == 0)
        let check = try Harness.run("/usr/bin/qemu-img", ["check", image])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let reader = try FileHandle(forReadingFrom: URL(fileURLWithPath: image))
        let header = try reader.read(upToCount: 80) ?? Data()
        try reader.close()
        #expect(header.count == 80 && header[79] & 1 == 0, "closed clean: the dirty bit is cleared")
    }

    /// A second server that cannot start (it cannot listen) leaves the
    /// first one's pid file alone; it used to remove it on the way out.
    @Test func aFailedSecondInstanceLeavesThePidFile() throws {
        let directory = try Harness.temporaryDirectory("pidfile")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let pidFile = directory.appendingPathComponent("strata.pid").path
        let first = try ServedImage(image: image, options: ["-f", "raw", "--pid-file", pidFile], directory: directory)
        defer { first.stop() }
        // The pid file is written once the server listens, just after the socket appears.
        let written = Date().addingTimeInterval(10)
        while !FileManager.default.fileExists(atPath: pidFile), Date() < written { usleep(10_000) }
        let pid = try String(contentsOfFile: pidFile, encoding: .utf8)
        let nowhere = directory.appendingPathComponent("missing/2.sock").path
        let second = try Harness.run(Harness.strata, ["serve", "-k", nowhere, "--pid-file", pidFile, "-f", "raw", image],
                                     timeout: 30)
        #expect(second.status == 1, "\(second.stderr)")
        #expect(second.stderr.contains("Failed to listen"), "\(second.stderr)")
        #expect(try String(contentsOfFile: pidFile, encoding: .utf8) == pid)
    }

    /// The variable by which a `--fork` parent tells its child to detach,
    /// left in the environment by something else, does not make a plain
    /// `serve` detach and send its errors to /dev/null.
    @Test func aStrayForkVariableDoesNotDetachAPlainServer() throws {
        let directory = try Harness.temporaryDirectory("fork-variable")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let served = try ServedImage(image: image, options: ["-f", "raw"], directory: directory,
                                     launcher: ["/usr/bin/env", "STRATA_FORK_PARENT_PID=1"])
        defer { served.stop() }
        #expect(try Harness.waitForSize(served.uri) == "16777216")
        let stderr = try FileManager.default.destinationOfSymbolicLink(
            atPath: "/proc/\(served.process.processIdentifier)/fd/2")
        #expect(stderr.hasPrefix("pipe:"), "the server's stderr is \(stderr)")
    }
}
