import Foundation
import Testing

/// Failure handling and listening modes with real clients: a full disk,
/// a stalled handshake, TCP, socket activation, --offset.
@Suite struct ServerBehaviourTests {
    @Test func writesPastAFileSizeLimitFailWithEnospcAndServingGoesOn() throws {
        let directory = try Harness.temporaryDirectory("enospc")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        // RLIMIT_FSIZE of 1 MiB: writes beyond it fail with EFBIG, as on a full disk.
        let limit = ["/usr/bin/python3", "-c",
                     "import os,resource,sys; resource.setrlimit(resource.RLIMIT_FSIZE,(1<<20,1<<20)); os.execv(sys.argv[1], sys.argv[1:])"]
        let served = try ServedImage(image: image, options: ["-f", "raw"], directory: directory, launcher: limit)
        defer { served.stop() }
        let failed = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x11 8M 64k", served.uri])
        #expect((failed.stdout + failed.stderr).contains("No space left on device"), "\(failed.stdout)\(failed.stderr)")
        let fine = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x22 0 64k", "-c", "read -P 0x22 0 64k",
                                                        served.uri])
        #expect(fine.status == 0 && !fine.stdout.contains("failed"), "\(fine.stdout)\(fine.stderr)")
        #expect(served.process.isRunning)
    }

    @Test func stalledHandshakesAreDroppedAndOthersServed() throws {
        let directory = try Harness.temporaryDirectory("stall")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let served = try ServedImage(image: image, options: ["-f", "raw", "--handshake-limit=1", "-e", "0"],
                                     directory: directory)
        defer { served.stop() }
        // A client that reads the greeting and then says nothing.
        let script = """
            import socket, sys, time
            s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(18)
            start = time.time(); data = s.recv(1)
            print("closed" if data == b"" else "data", round(time.time() - start, 1))
            """
        let stalled = try Harness.run("/usr/bin/python3", ["-c", script, served.socket], timeout: 20)
        #expect(stalled.stdout.hasPrefix("closed"), "\(stalled.stdout)\(stalled.stderr)")
        let info = try Harness.run("/usr/bin/nbdinfo", ["--size", served.uri])
        #expect(info.status == 0)
    }

    @Test func servesOverTCP() throws {
        let directory = try Harness.temporaryDirectory("tcp")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let port = 20000 + Int.random(in: 0..<20000)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.strata)
        process.arguments = ["serve", "-f", "raw", "-t", "-b", "127.0.0.1", "-p", String(port), image]
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { kill(process.processIdentifier, SIGTERM); process.waitUntilExit() }
        #expect(try Harness.waitForSize("nbd://127.0.0.1:\(port)") == "16777216")
    }

    /// Without -k, -p or -b, as qemu-nbd: TCP port 10809 on every IPv4
    /// address. Skipped where something else holds the port.
    @Test(.enabled(if: portIsFree(10809), "TCP port 10809 is in use on this machine"))
    func defaultsListenOnPort10809OnEveryAddress() throws {
        let directory = try Harness.temporaryDirectory("default-port")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.strata)
        process.arguments = ["serve", "-f", "raw", "-t", image]
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { kill(process.processIdentifier, SIGTERM); process.waitUntilExit() }
        #expect(try Harness.waitForSize("nbd://127.0.0.1") == "16777216")
        // Listening (state 0A) on 0.0.0.0, port 0x2A39.
        let table = try String(contentsOfFile: "/proc/net/tcp", encoding: .utf8)
        #expect(table.split(separator: "\n").contains { $0.contains(" 00000000:2A39 ") && $0.contains(" 0A ") },
                "no listener on 0.0.0.0:10809 in /proc/net/tcp")
    }

    @Test func adoptsASocketPassedBySystemd() throws {
        let directory = try Harness.temporaryDirectory("activate")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let socket = directory.appendingPathComponent("activated.sock").path
        // What systemd does: listen, pass the socket as fd 3, name our pid.
        let activate = """
            import os, socket, sys
            s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)
            os.dup2(s.fileno(), 3); os.set_inheritable(3, True)
            os.environ["LISTEN_PID"] = str(os.getpid()); os.environ["LISTEN_FDS"] = "1"
            os.execv(sys.argv[2], sys.argv[2:])
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", activate, socket, Harness.strata, "serve", "-f", "raw", "-t", image]
        process.standardError = FileHandle.nullDevice
        try process.run()
        defer { kill(process.processIdentifier, SIGTERM); process.waitUntilExit() }
        #expect(try Harness.waitForSize("nbd+unix:///?socket=\(socket)") == "16777216")
    }

    @Test func offsetServesTheRestOfTheImage() throws {
        let directory = try Harness.temporaryDirectory("offset")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory, size: "1M")
        let write = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x3c 4096 4096", image])
        try #require(write.status == 0)
        let served = try ServedImage(image: image, options: ["-f", "raw", "-o", "4096"], directory: directory)
        defer { served.stop() }
        let info = try Harness.run("/usr/bin/nbdinfo", ["--size", served.uri])
        #expect(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == String(1048576 - 4096))
        let read = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "read -P 0x3c 0 4096", served.uri])
        #expect(read.status == 0 && !read.stdout.contains("verification failed"), "\(read.stdout)")
    }

    /// qemu-nbd 7.2 rounds an `--offset` window up to whole sectors and then
    /// aborts (`nbd_co_send_sparse_read: Assertion ... failed`) when a client
    /// reads the rounded tail, so Strata serves the window as it is.
    @Test func anOddWindowIsServedToItsLastByte() throws {
        let directory = try Harness.temporaryDirectory("oddwindow")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("odd.raw").path
        let bytes = (0..<1_000_000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        try Data(bytes).write(to: URL(fileURLWithPath: image))
        let served = try ServedImage(image: image, options: ["-f", "raw", "-r", "-o", "100"], directory: directory)
        defer { served.stop() }
        // The file is a disk of 1,000,448 bytes (whole sectors); the window is all of it after byte 100.
        let info = try Harness.run("/usr/bin/nbdinfo", ["--size", served.uri])
        #expect(info.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "1000348")
        let copy = directory.appendingPathComponent("copy.raw").path
        let out = try Harness.run("/usr/bin/nbdcopy", [served.uri, copy])
        #expect(out.status == 0, "\(out.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: copy)) == Data(bytes.dropFirst(100)) + Data(count: 448))
        let map = try Harness.run("/usr/bin/nbdinfo", ["--map", served.uri])
        #expect(map.status == 0, "\(map.stderr)")
        let mapped = map.stdout.split(separator: "\n").compactMap { line in
            line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { Int($0) }
        }
        #expect(mapped.reduce(0, +) == 1_000_348, "\(map.stdout)")
    }

    @Test(arguments: [["--cache=none", "--aio=native"], ["--cache=none"], []])
    func anImageOfOddSizeIsServedWhole(options: [String]) throws {
        let directory = try Harness.temporaryDirectory("odd")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("odd.raw").path
        let bytes = (0..<1_000_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        try Data(bytes).write(to: URL(fileURLWithPath: image))
        let served = try ServedImage(image: image, options: ["-f", "raw"] + options, directory: directory)
        let copy = directory.appendingPathComponent("copy.raw").path
        let out = try Harness.run("/usr/bin/nbdcopy", [served.uri, copy])
        #expect(out.status == 0, "\(out.stderr)")
        // As through qemu-nbd: whole sectors, the part past the file reading as zeroes.
        #expect(try Data(contentsOf: URL(fileURLWithPath: copy)) == Data(bytes) + Data(count: 448))
        let tail = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x99 999990 10",
                                                        "-c", "read -P 0x99 999990 10", served.uri])
        #expect(tail.status == 0 && !tail.stdout.contains("failed"), "\(tail.stdout)\(tail.stderr)")
        #expect(served.stop() == 0)
        let onDisk = try Data(contentsOf: URL(fileURLWithPath: image))
        #expect(onDisk.prefix(999_990) == Data(bytes).prefix(999_990))
        #expect(Array(onDisk[999_990..<1_000_000]) == [UInt8](repeating: 0x99, count: 10))
    }

    @Test func theConnectionCapMakesExtraClientsWait() throws {
        let directory = try Harness.temporaryDirectory("cap")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = try Harness.makeImage(in: directory)
        let served = try ServedImage(image: image, options: ["-f", "raw", "-e", "1"], directory: directory)
        defer { served.stop() }
        // The first client negotiates and stays; a second one is not served
        // until the first leaves, as with qemu-nbd.
        let script = """
            import nbd, subprocess, sys, time
            first = nbd.NBD(); first.connect_uri(sys.argv[1])
            second = subprocess.Popen(["nbdinfo", "--size", sys.argv[1]], stdout=subprocess.PIPE)
            time.sleep(1.5)
            print("waiting" if second.poll() is None else "served-early")
            first.shutdown(); del first
            out, _ = second.communicate(timeout=20)
            print(out.decode().strip())
            """
        let result = try Harness.run("/usr/bin/python3", ["-c", script, served.uri], timeout: 40)
        #expect(result.stdout.split(separator: "\n") == ["waiting", "16777216"], "\(result.stdout)\(result.stderr)")
    }

    /// A client that sends large READs and never reads the replies does not
    /// hold a shutdown past --shutdown-limit: it is closed, and the image
    /// is still flushed and closed cleanly (a lazy-refcounts qcow2 whose
    /// dirty bit is cleared, with another client's write on disk).
    @Test func aClientThatStopsReadingDoesNotHoldAShutdown() throws {
        let directory = try Harness.temporaryDirectory("stopread")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("disk.qcow2").path
        #expect(try Harness.run("/usr/bin/qemu-img", ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", image, "64M"]).status == 0)
        let served = try ServedImage(image: image, options: ["-f", "qcow2", "-e", "2", "--shutdown-limit=1"],
                                     directory: directory)
        defer { served.stop() }
        // Negotiates (EXPORT_NAME, no zeroes), sends 64 READs of 32 MiB, and
        // then only sleeps.
        let script = """
            import socket, struct, sys, time
            s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
            def recv(n):
                data = b""
                while len(data) < n: data += s.recv(n - len(data))
                return data
            recv(18); s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 0)); recv(10)
            s.sendall(b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 32 << 20) for i in range(64)))
            print("sent", flush=True)
            time.sleep(60)
            """
        let client = Process()
        client.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        client.arguments = ["-c", script, served.socket]
        let output = Pipe()
        client.standardOutput = output
        try client.run()
        defer {
            if client.isRunning { kill(client.processIdentifier, SIGKILL) }
            client.waitUntilExit()
        }
        let said = String(decoding: output.fileHandleForReading.availableData, as: UTF8.self)
        #expect(said.hasPrefix("sent"), "\(said)")
        let write = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x3c 1M 64k", served.uri])
        #expect(write.status == 0, "\(write.stderr)")
        let start = Date()
        let status = served.stop()  // SIGTERM; SIGKILL after 10 s
        #expect(status == 0, "exit status \(status) after \(Date().timeIntervalSince(start)) s")
        #expect(Date().timeIntervalSince(start) < 8)
        // The client holds an inherited copy of the server's stderr pipe:
        // end it before reading that pipe to the end.
        kill(client.processIdentifier, SIGKILL)  // SIGTERM may be blocked in children of the test runner
        client.waitUntilExit()
        #expect(served.errors().contains("closed 1 client(s) that did not take their replies"), "\(served.errors())")
        #expect(try Harness.run("/usr/bin/qemu-img", ["check", image]).status == 0)
        let info = try Harness.run("/usr/bin/qemu-img", ["info", "--output=json", image])
        #expect(info.stdout.contains("\"dirty-flag\": false"), "\(info.stdout)")
        let read = try Harness.run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "read -P 0x3c 1M 64k", image])
        #expect(read.status == 0 && !read.stdout.contains("fail"), "\(read.stdout)")
    }

    /// Replies go straight to the socket while NIO holds none of the
    /// connection's, and through NIO once the client falls behind. A client
    /// that sends rounds of READs of 512 B to 2 MiB and FLUSHes, and reads
    /// the replies only after a pause through a small receive buffer, gets
    /// every reply whole, its data right, and the connection's end after
    /// DISC. Buffered (sendfile for cached data) and O_DIRECT.
    @Test(arguments: [[], ["--cache=none", "--aio=native"]])
    func repliesStayWholeWhenTheClientFallsBehind(options: [String]) throws {
        let directory = try Harness.temporaryDirectory("behind")
        defer { try? FileManager.default.removeItem(at: directory) }
        let image = directory.appendingPathComponent("disk.raw").path
        #expect(FileManager.default.createFile(atPath: image, contents: Data((0..<(16 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 131 ^ $0 >> 9) })))
        let served = try ServedImage(image: image, options: ["-f", "raw"] + options, directory: directory)
        defer { served.stop() }
        let script = """
            import random, socket, struct, sys, time
            image = open(sys.argv[1], "rb").read()
            s = socket.socket(socket.AF_UNIX); s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096); s.connect(sys.argv[2])
            def recv(n):
                data = bytearray()
                while len(data) < n:
                    chunk = s.recv(min(n - len(data), 1 << 16))
                    if not chunk: sys.exit(f"connection closed after {len(data)} of {n} bytes")
                    data += chunk
                return bytes(data)
            recv(18); s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 0)); recv(10)
            rng = random.Random(7); cookie = 0; replies = 0
            for round in range(4):
                expected = {}
                for i in range(48):
                    cookie += 1
                    if i % 5 == 4:
                        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 3, cookie, 0, 0)); expected[cookie] = (0, 0)
                    else:
                        length = rng.choice([512, 4096, 65536, 1 << 21]); offset = rng.randrange(0, len(image) - length) & ~511
                        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, offset, length)); expected[cookie] = (offset, length)
                time.sleep(0.2)
                while expected:
                    magic, error, handle = struct.unpack(">IIQ", recv(16))
                    if magic != 0x67446698 or error != 0 or handle not in expected: sys.exit(f"reply {replies}: {magic:#x} {error} {handle}")
                    offset, length = expected.pop(handle)
                    if recv(length) != image[offset:offset + length]: sys.exit(f"reply {replies}: wrong data")
                    replies += 1
            s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
            s.settimeout(10)
            print("ok", replies, "end" if s.recv(1) == b"" else "more")
            """
        let client = try Harness.run("/usr/bin/python3", ["-c", script, image, served.socket], timeout: 60)
        #expect(client.stdout == "ok 192 end\n", "\(client.stdout)\(client.stderr)")
    }
}

/// Whether a TCP port can be bound on every IPv4 address right now.
private func portIsFree(_ port: Int) -> Bool {
    let probe = "import socket; s = socket.socket(); s.bind(('0.0.0.0', \(port)))"
    return (try? Harness.run("/usr/bin/python3", ["-c", probe]).status) == 0
}
