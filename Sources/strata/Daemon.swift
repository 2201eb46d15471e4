import CLinuxAIO
import FoundationEssentials
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
        // The child gets the pipe as its stdout and nothing else of ours:
        // descriptors past stderr are closed in it.
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        let prepared = posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO) == 0
            && strata_spawn_close_from(&actions, 3) == 0
        var environment = ProcessInfo.processInfo.environment
        environment[notifyVariable] = String(getpid())
        let executable = realpath("/proc/self/exe", nil).map { path in
            defer { free(path) }
            return String(cString: path)
        } ?? "/proc/self/exe"
        let arguments = [executable] + CommandLine.arguments.dropFirst()
        let variables = environment.map { "\($0.key)=\($0.value)" }
        var child = pid_t()
        let spawned = !prepared ? ENOMEM : withCStringArray(arguments) { argv in
            withCStringArray(variables) { envp in posix_spawn(&child, executable, &actions, nil, argv, envp) }
        }
        close(fds[1])
        guard spawned == 0 else {
            close(fds[0])
            StandardError.write("strata: cannot start the server: \(String(cString: strerror(spawned)))\n")
            return 1
        }
        var byte: UInt8 = 0
        let count = read(fds[0], &byte, 1)
        close(fds[0])
        if count == 1, byte == 0 { return 0 }
        var status: Int32 = 0
        while waitpid(child, &status, 0) < 0, errno == EINTR {}
        // The child's exit status, or the signal that ended it.
        let exitStatus = status & 0x7f == 0 ? (status >> 8) & 0xff : status & 0x7f
        return exitStatus == 0 ? 1 : exitStatus
    }

    /// `strings` as the NULL-terminated array of C strings that exec takes.
    private static func withCStringArray<Result>(_ strings: [String],
                                                 _ body: ([UnsafeMutablePointer<CChar>?]) -> Result) -> Result {
        let pointers = strings.map { strdup($0) } + [nil]
        defer { pointers.forEach { free($0) } }
        return body(pointers)
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
