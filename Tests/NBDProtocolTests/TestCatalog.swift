import NBDProtocol

/// A fixed set of exports for negotiation tests.
struct TestCatalog: NBDExportCatalog {
    var exports: [NBDExportDescriptor] = [
        NBDExportDescriptor(name: "disk", description: "a test disk", size: 1 << 20,
                            transmissionFlags: [.hasFlags, .sendFlush, .sendFUA, .sendDF, .sendTrim],
                            metaContexts: ["base:allocation", "qemu:allocation-depth"]),
        NBDExportDescriptor(name: "", size: 4096, transmissionFlags: [.hasFlags, .readOnly]),
    ]

    func descriptor(named name: String) -> NBDExportDescriptor? { exports.first { $0.name == name } }
    func allDescriptors() -> [NBDExportDescriptor] { exports }
}
