import Foundation

/// systemd socket activation: listening sockets passed as fds 3… with
/// LISTEN_PID naming this process and LISTEN_FDS their count.
enum SocketActivation {
    static let firstDescriptor: CInt = 3

    static func listeningDescriptors() -> [CInt]? {
        let environment = ProcessInfo.processInfo.environment
        guard let pid = environment["LISTEN_PID"].flatMap(Int32.init), pid == getpid(),
              let count = environment["LISTEN_FDS"].flatMap(Int32.init), count > 0 else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        return (0..<count).map { firstDescriptor + $0 }
    }
}
