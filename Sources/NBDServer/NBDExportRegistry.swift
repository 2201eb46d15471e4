import NBDProtocol

/// The exports a server offers, looked up by negotiation.
/// Confined to the server's event loop.
public final class NBDExportRegistry: NBDExportCatalog {
    public private(set) var exports: [NBDExport] = []

    public init() {}

    public func add(_ newExport: NBDExport) throws {
        guard export(named: newExport.name) == nil else {
            throw NBDServerError.duplicateExport(newExport.name)
        }
        exports.append(newExport)
    }

    public func remove(named name: String) {
        exports.removeAll { $0.name == name }
    }

    public func export(named name: String) -> NBDExport? {
        exports.first { $0.name == name }
    }

    public func descriptor(named name: String) -> NBDExportDescriptor? {
        export(named: name)?.descriptor
    }

    public func allDescriptors() -> [NBDExportDescriptor] {
        exports.map(\.descriptor)
    }
}

/// Errors of the server's own configuration.
public enum NBDServerError: Error, CustomStringConvertible {
    case duplicateExport(String)

    public var description: String {
        switch self {
        case .duplicateExport(let name): return "export '\(name)' already exists"
        }
    }
}
