import ArgumentParser
import FoundationEssentials
import Glibc

@main
struct Strata: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "strata",
        abstract: "Serve disk images over NBD, with a block layer in the image of QEMU's.",
        version: "0.1.0",
        subcommands: [Serve.self, Img.self]
    )

    /// ArgumentParser's own entry point, except that a usage error exits
    /// with 1, as qemu-nbd and qemu-img do, not with 64 (EX_USAGE): scripts
    /// written for them test for 1.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            guard exitCode(for: error) == .validationFailure else { exit(withError: error) }
            StandardError.write(fullMessage(for: error) + "\n")
            Glibc.exit(1)
        }
    }
}
