import Foundation
import Testing

/// Runs the real `strata` binary and the real client tools for interop tests.
enum Harness {
    /// The `strata` built next to this test bundle (or `STRATA_BINARY`).
    static var strata: String {
        // Made absolute: some tests run it from another directory.
        if let path = ProcessInfo.processInfo.environment["STRATA_BINARY"] { return URL(fileURLWithPath: path).path }
        let bundle = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        var candidates = [bundle.appendingPathComponent("strata")]
        // `swift test` may run the bundle from inside its .xctest directory.
        candidates.append(bundle.deletingLastPathComponent().appendingPathComponent("strata"))
        for candidate in candidates where FileManager.default.isExecutableFile(atPath: candidate.path) {
            return candidate.path
        }
        return candidates[0].path
    }

    static let scripts = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Scripts")

    struct Output {
        var status: Int32
        var stdout: String
        var stderr: String
    }

    /// Runs a command to completion with a time limit; the process is killed
    /// if it overstays.
    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
                    currentDirectory: String? = nil, timeout: TimeInterval = 120) throws -> Output {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let currentDirectory { process.currentDirectoryURL = URL(fileURLWithPath: currentDirectory) }
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        let out = Pipe()
        let err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // Both pipes drain concurrently so a chatty child never blocks.
        final class Collected: @unchecked Sendable { var out = Data(); var err = Data() }
        let collected = Collected()
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().async { collected.out = out.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        group.enter()
        DispatchQueue.global().async { collected.err = err.fileHandleForReading.readDataToEndOfFile(); group.leave() }
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning, Date() < deadline { usleep(20_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
        }
        process.waitUntilExit()
        group.wait()
        return Output(status: process.terminationStatus,
                      stdout: String(decoding: collected.out, as: UTF8.self),
                      stderr: String(decoding: collected.err, as: UTF8.self))
    }

    /// A sparse raw image made by qemu-img in `directory`.
    static func makeImage(in directory: URL, size: String = "16M") throws -> String {
        let path = directory.appendingPathComponent("disk.raw").path
        let made = try run("/usr/bin/qemu-img", ["create", "-f", "raw", path, size])
        guard made.status == 0 else { throw ServedImage.ServeFailure(message: "qemu-img create: \(made.stderr)") }
        return path
    }

    /// The export size nbdinfo reports once a server started some other way
    /// answers (up to 5 s); empty if it never does.
    static func waitForSize(_ uri: String) throws -> String {
        for _ in 0..<100 {
            let info = try run("/usr/bin/nbdinfo", ["--size", uri])
            if info.status == 0 { return info.stdout.trimmingCharacters(in: .whitespacesAndNewlines) }
            usleep(50_000)
        }
        return ""
    }

    /// A fresh temporary directory, removed by `cleanUp`.
    static func temporaryDirectory(_ tag: String) throws -> URL {
        let url = URL(fileURLWithPath: NSTemporaryDirectory())
            .appendingPathComponent("strata-test-\(tag)-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }
}

/// A `strata serve` started for one test and always stopped after it.
final class ServedImage {
    let directory: URL
    let socket: String
    let process = Process()
    private let errorPipe = Pipe()

    var uri: String { "nbd+unix:///?socket=\(socket)" }

    /// Starts `strata serve -k SOCKET -t OPTIONS IMAGE`, through `launcher`
    /// (a command that execs its arguments) when given.
    init(image: String, options: [String], directory: URL, launcher: [String] = []) throws {
        self.directory = directory
        socket = directory.appendingPathComponent("nbd.sock").path
        let command = [Harness.strata, "serve", "-k", socket, "-t"] + options + [image]
        process.executableURL = URL(fileURLWithPath: launcher.first ?? Harness.strata)
        process.arguments = launcher.isEmpty ? Array(command.dropFirst()) : Array(launcher.dropFirst()) + command
        process.standardError = errorPipe
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !FileManager.default.fileExists(atPath: socket) {
            guard process.isRunning, Date() < deadline else {
                stop()
                throw ServeFailure(message: "server did not start: \(errors())")
            }
            usleep(20_000)
        }
    }

    struct ServeFailure: Error, CustomStringConvertible {
        var message: String
        var description: String { message }
    }

    func errors() -> String {
        if process.isRunning { return "" }
        return String(decoding: errorPipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    }

    /// `signal` (SIGTERM unless told), then SIGKILL if it has not gone within 10 s.
    @discardableResult
    func stop(signal: Int32 = SIGTERM) -> Int32 {
        if process.isRunning {
            kill(process.processIdentifier, signal)
            let deadline = Date().addingTimeInterval(10)
            while process.isRunning, Date() < deadline { usleep(20_000) }
            if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    deinit {
        stop()
    }
}
