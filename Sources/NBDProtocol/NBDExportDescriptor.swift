/// What negotiation needs to know about an export: the protocol's view of
/// it, with nothing of the block layer behind it.
public struct NBDExportDescriptor: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    /// Flags for a client that negotiated structured replies; `sendDF` is
    /// removed for clients that did not.
    public var transmissionFlags: NBDTransmissionFlags
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumBlockSize: UInt32
    /// Metadata contexts this export can serve, e.g. `base:allocation`.
    /// A context's id on the wire is its index here.
    public var metaContexts: [String]

    public init(
        name: String, description: String = "", size: UInt64,
        transmissionFlags: NBDTransmissionFlags,
        minimumBlockSize: UInt32 = 1, preferredBlockSize: UInt32 = 4096,
        maximumBlockSize: UInt32 = UInt32(NBDLimits.maxPayload),
        metaContexts: [String] = ["base:allocation"]
    ) {
        self.name = name
        self.description = description
        self.size = size
        self.transmissionFlags = transmissionFlags
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
        self.maximumBlockSize = maximumBlockSize
        self.metaContexts = metaContexts
    }
}

/// Where negotiation looks exports up; the server's registry conforms.
public protocol NBDExportCatalog {
    func descriptor(named name: String) -> NBDExportDescriptor?
    func allDescriptors() -> [NBDExportDescriptor]
}

/// A metadata context selected with NBD_OPT_SET_META_CONTEXT.
public struct NBDMetaContext: Sendable, Equatable {
    public var id: UInt32
    public var name: String
    public init(id: UInt32, name: String) {
        self.id = id
        self.name = name
    }
}

/// What a finished negotiation hands to the transmission phase.
public struct NBDSession: Sendable, Equatable {
    public var export: NBDExportDescriptor
    public var structuredReplies: Bool
    public var metaContexts: [NBDMetaContext]
    /// The flags actually sent to this client.
    public var transmissionFlags: NBDTransmissionFlags
}
