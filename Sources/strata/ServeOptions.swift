import ArgumentParser
import BlockDrivers
import BlockLayer

extension CacheMode: ExpressibleByArgument {
    /// QEMU's names, and "off", which QEMU takes for none.
    public init?(argument: String) {
        self.init(rawValue: argument == "off" ? "none" : argument)
    }
}
extension FileAIOMode: ExpressibleByArgument {}
extension DetectZeroesMode: ExpressibleByArgument {}

/// `--discard` takes QEMU's four spellings.
struct DiscardArgument: ExpressibleByArgument {
    var mode: DiscardMode
    init?(argument: String) {
        guard let mode = DiscardMode(qemuName: argument) else { return nil }
        self.mode = mode
    }
    static var allValueStrings: [String] { ["ignore", "off", "unmap", "on"] }
    var defaultValueDescription: String { mode.rawValue }
}
