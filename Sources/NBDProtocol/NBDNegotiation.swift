import NIOCore

/// The server's side of fixed-newstyle negotiation, as a state machine.
///
/// Feed it what `NBDHandshakeDecoder` parses; it writes the replies into the
/// buffer you pass and returns what the connection must do next. It does no
/// I/O and knows exports only through an `NBDExportCatalog`.
public struct NBDNegotiation: Sendable {
    public enum Action: Equatable, Sendable {
        /// Send what was written (if anything) and read the next option.
        case proceed
        /// Send what was written, then switch to the transmission phase.
        case startTransmission(NBDSession)
        /// Send what was written, then close the connection.
        case close(reason: String)
    }

    fileprivate enum State: Sendable {
        case awaitingClientFlags
        case negotiating(Negotiating)
        case finished
    }

    /// Per-connection choices made by options so far.
    fileprivate struct Negotiating: Sendable {
        var noZeroes: Bool
        var structuredReplies = false
        var metaContexts: [NBDMetaContext] = []
        var metaContextExport: String?
    }

    private var state: State = .awaitingClientFlags

    public init() {}

    /// The flags Strata offers: fixed newstyle and no-zeroes.
    public static let serverFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]

    public static func writeGreeting(into buffer: inout ByteBuffer) {
        NBDReplyEncoder.writeGreeting(flags: serverFlags, into: &buffer)
    }

    public mutating func receive(
        _ message: NBDHandshakeDecoder.Message, catalog: NBDExportCatalog, into out: inout ByteBuffer
    ) -> Action {
        switch (state, message) {
        case (.awaitingClientFlags, .clientFlags(let flags)):
            let unknown = flags.subtracting(NBDClientFlags.known)
            guard unknown.isEmpty else {
                state = .finished
                return .close(reason: "client sent unknown flags 0x\(String(unknown.rawValue, radix: 16))")
            }
            state = .negotiating(Negotiating(noZeroes: flags.contains(.noZeroes)))
            return .proceed

        case (.negotiating(var negotiating), .option(let option)):
            let action = negotiating.handle(option, catalog: catalog, into: &out)
            switch action {
            case .proceed: state = .negotiating(negotiating)
            case .startTransmission, .close: state = .finished
            }
            return action

        case (.awaitingClientFlags, .option):
            state = .finished
            return .close(reason: "option before client flags")
        case (.negotiating, .clientFlags), (.finished, _):
            state = .finished
            return .close(reason: "unexpected message")
        }
    }
}

extension NBDNegotiation.Negotiating {
    mutating func handle(
        _ option: NBDOptionRequest, catalog: NBDExportCatalog, into out: inout ByteBuffer
    ) -> NBDNegotiation.Action {
        let code = option.code
        switch option {
        case .exportName(let name):
            // This option has no error reply: an unknown export closes.
            guard name.utf8.count <= NBDLimits.maxString, let export = catalog.descriptor(named: name) else {
                return .close(reason: "NBD_OPT_EXPORT_NAME for unknown export '\(name.prefix(64))'")
            }
            dropMetaContexts(unlessChosenFor: name)
            let session = makeSession(export)
            out.writeInteger(export.size)
            out.writeInteger(session.transmissionFlags.rawValue)
            if !noZeroes { out.writeRepeatingByte(0, count: 124) }
            return .startTransmission(session)

        case .abort:
            NBDReplyEncoder.writeOptionReply(option: code, type: .ack, payloadLength: 0, into: &out)
            return .close(reason: "client aborted negotiation")

        case .list:
            for export in catalog.allDescriptors() {
                let name = Array(export.name.utf8)
                let description = Array(export.description.utf8)
                NBDReplyEncoder.writeOptionReply(option: code, type: .server,
                                                 payloadLength: 4 + name.count + description.count, into: &out)
                out.writeInteger(UInt32(name.count))
                out.writeBytes(name)
                out.writeBytes(description)
            }
            NBDReplyEncoder.writeOptionReply(option: code, type: .ack, payloadLength: 0, into: &out)
            return .proceed

        case .info(let name, let requests), .go(let name, let requests):
            guard let export = catalog.descriptor(named: name) else {
                NBDReplyEncoder.writeOptionError(option: code, type: .errUnknown,
                                                 message: "export '\(name.prefix(256))' not present", into: &out)
                return .proceed
            }
            let isGo: Bool
            if case .go = option { isGo = true } else { isGo = false }
            if isGo { dropMetaContexts(unlessChosenFor: name) }
            let session = makeSession(export)
            writeInfo(for: export, flags: session.transmissionFlags, requests: requests, option: code, into: &out)
            NBDReplyEncoder.writeOptionReply(option: code, type: .ack, payloadLength: 0, into: &out)
            return isGo ? .startTransmission(session) : .proceed

        case .structuredReply:
            if structuredReplies {
                NBDReplyEncoder.writeOptionError(option: code, type: .errInvalid,
                                                 message: "structured replies already negotiated", into: &out)
                return .proceed
            }
            structuredReplies = true
            NBDReplyEncoder.writeOptionReply(option: code, type: .ack, payloadLength: 0, into: &out)
            return .proceed

        case .listMetaContext(let name, let queries), .setMetaContext(let name, let queries):
            let isSet: Bool
            if case .setMetaContext = option { isSet = true } else { isSet = false }
            if isSet {
                // SET replaces the selection even when it fails.
                metaContexts = []
                metaContextExport = nil
            }
            guard structuredReplies else {
                NBDReplyEncoder.writeOptionError(option: code, type: .errInvalid,
                                                 message: "metadata contexts need structured replies first", into: &out)
                return .proceed
            }
            guard let export = catalog.descriptor(named: name) else {
                NBDReplyEncoder.writeOptionError(option: code, type: .errUnknown,
                                                 message: "export '\(name.prefix(256))' not present", into: &out)
                return .proceed
            }
            let matches = Self.match(queries: queries, in: export.metaContexts, exactOnly: isSet)
            for context in matches {
                let bytes = Array(context.name.utf8)
                NBDReplyEncoder.writeOptionReply(option: code, type: .metaContext,
                                                 payloadLength: 4 + bytes.count, into: &out)
                out.writeInteger(context.id)
                out.writeBytes(bytes)
            }
            if isSet {
                metaContexts = matches
                metaContextExport = name
            }
            NBDReplyEncoder.writeOptionReply(option: code, type: .ack, payloadLength: 0, into: &out)
            return .proceed

        case .unsupported:
            NBDReplyEncoder.writeOptionError(option: code, type: .errUnsupported,
                                             message: "option \(code) not supported", into: &out)
            return .proceed

        case .invalid(_, let reason):
            if code == NBDOptionCode.setMetaContext.rawValue {
                metaContexts = []
                metaContextExport = nil
            }
            NBDReplyEncoder.writeOptionError(option: code, type: .errInvalid, message: reason, into: &out)
            return .proceed

        case .tooBig where code == NBDOptionCode.exportName.rawValue:
            // EXPORT_NAME has no error reply; the client would misread one.
            return .close(reason: "NBD_OPT_EXPORT_NAME too long")

        case .tooBig:
            if code == NBDOptionCode.setMetaContext.rawValue {
                metaContexts = []
                metaContextExport = nil
            }
            NBDReplyEncoder.writeOptionError(option: code, type: .errTooBig,
                                             message: "option \(code) is too long", into: &out)
            return .proceed
        }
    }

    /// Contexts chosen for another export do not carry over to `name`.
    private mutating func dropMetaContexts(unlessChosenFor name: String) {
        guard let selectedFor = metaContextExport, selectedFor != name else { return }
        metaContexts = []
        metaContextExport = nil
    }

    private func makeSession(_ export: NBDExportDescriptor) -> NBDSession {
        var flags = export.transmissionFlags
        if !structuredReplies { flags.remove(.sendDF) }
        return NBDSession(export: export, structuredReplies: structuredReplies,
                          metaContexts: metaContexts, transmissionFlags: flags)
    }

    private func writeInfo(
        for export: NBDExportDescriptor, flags: NBDTransmissionFlags, requests: [UInt16],
        option: UInt32, into out: inout ByteBuffer
    ) {
        NBDReplyEncoder.writeOptionReply(option: option, type: .info, payloadLength: 12, into: &out)
        out.writeInteger(NBDInfoType.export.rawValue)
        out.writeInteger(export.size)
        out.writeInteger(flags.rawValue)
        if requests.contains(NBDInfoType.name.rawValue) {
            let bytes = Array(export.name.utf8)
            NBDReplyEncoder.writeOptionReply(option: option, type: .info, payloadLength: 2 + bytes.count, into: &out)
            out.writeInteger(NBDInfoType.name.rawValue)
            out.writeBytes(bytes)
        }
        if requests.contains(NBDInfoType.description.rawValue), !export.description.isEmpty {
            let bytes = Array(export.description.utf8.prefix(NBDLimits.maxString))
            NBDReplyEncoder.writeOptionReply(option: option, type: .info, payloadLength: 2 + bytes.count, into: &out)
            out.writeInteger(NBDInfoType.description.rawValue)
            out.writeBytes(bytes)
        }
        // Block sizes are always sent: a minimum of 1 asks nothing of clients
        // that did not request them, and helps those that did not know to.
        NBDReplyEncoder.writeOptionReply(option: option, type: .info, payloadLength: 14, into: &out)
        out.writeInteger(NBDInfoType.blockSize.rawValue)
        out.writeInteger(export.minimumBlockSize)
        out.writeInteger(export.preferredBlockSize)
        out.writeInteger(export.maximumBlockSize)
    }

    /// Matches queries against an export's contexts. LIST with no query lists
    /// everything; a query ending in ':' (a namespace such as `base:` or a
    /// leaf prefix such as `qemu:dirty-bitmap:`) lists what it prefixes, for
    /// LIST only; otherwise names must match exactly.
    static func match(queries: [String], in available: [String], exactOnly: Bool) -> [NBDMetaContext] {
        var selected: [NBDMetaContext] = []
        func add(_ index: Int) {
            let context = NBDMetaContext(id: UInt32(index), name: available[index])
            if !selected.contains(context) { selected.append(context) }
        }
        if queries.isEmpty {
            if !exactOnly { available.indices.forEach(add) }
            return selected
        }
        for query in queries {
            for (index, name) in available.enumerated() {
                if name == query || (!exactOnly && query.hasSuffix(":") && name.hasPrefix(query)) {
                    add(index)
                }
            }
        }
        return selected
    }
}
