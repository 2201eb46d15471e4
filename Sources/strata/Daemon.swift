import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `--fork` without fork(2): a multithreaded process cannot safely fork,
/// so the parent re-runs itself as the server, with the child's stdout on
/// a pipe, and waits until the child writes one byte there (it listens)
/// or dies; then it exits with the matching status.
enum Daemon {
    static let notifyVariable = "STRATA_FORK_PARENT_PID"

    /// Whether this process is the server a `--fork` parent started. The
    /// variable holds the parent's pid, so one left in the environment by
    /// something else does not make a plain `serve` detach and go silent.
    /// Decided once, at the start, while the parent waits for the child.
    static let isChild: Bool =
        ProcessInfo.processInfo.environment[notifyVariable].flatMap { pid_t($0) } == getppid()

    /// Parent side: 0 once the child listens, 1 if it failed to start.
    static func spawnChildAndWait() -> Int32 {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else {
            perror("strata: pipe")
            return 1
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        process.arguments = Array(CommandLine.arguments.dropFirst())
        var environment = ProcessInfo.processInfo.environment
        environment[notifyVariable] = String(getpid())
        process.environment = environment
        process.standardOutput = FileHandle(fileDescriptor: fds[1], closeOnDealloc: false)
        do {
            try process.run()
        } catch {
            FileHandle.standardError.write(Data("strata: cannot start the server: \(error)\n".utf8))
            return 1
        }
        close(fds[1])
        var byte: UInt8 = 0
        let count = read(fds[0], &byte, 1)
        close(fds[0])
        if count == 1, byte == 0 { return 0 }
        process.waitUntilExit()
        return process.terminationStatus == 0 ? 1 : process.terminationStatus
    }

    /// Child side: detaches from the terminal and tells the parent it is up.
    static func notifyReady() {
        guard isChild else { return }
        setsid()
        var byte: UInt8 = 0
        _ = write(STDOUT_FILENO, &byte, 1)
        unsetenv(notifyVariable)
        let null = open("/dev/null", O_RDWR)
        if null >= 0 {
            dup2(null, STDIN_FILENO)
            dup2(null, STDOUT_FILENO)
            dup2(null, STDERR_FILENO)
            close(null)
        }
    }
}
