import ArgumentParser

@main
struct Strata: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "strata",
        abstract: "Serve disk images over NBD, with a block layer in the image of QEMU's.",
        version: "0.1.0",
        subcommands: [Serve.self, Img.self]
    )
}
