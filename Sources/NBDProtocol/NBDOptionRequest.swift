import NIOCore

/// One option of the negotiation phase, parsed and validated.
///
/// Parsing never fails: malformed payloads become `.invalid`, so the state
/// machine can answer NBD_REP_ERR_INVALID and carry on, as the spec asks.
public enum NBDOptionRequest: Equatable, Sendable {
    case exportName(String)
    case abort
    case list
    case info(exportName: String, requests: [UInt16])
    case go(exportName: String, requests: [UInt16])
    case structuredReply
    case listMetaContext(exportName: String, queries: [String])
    case setMetaContext(exportName: String, queries: [String])
    /// An option Strata does not implement (including STARTTLS and
    /// EXTENDED_HEADERS): answered with NBD_REP_ERR_UNSUP.
    case unsupported(code: UInt32)
    /// A known option whose payload does not parse.
    case invalid(code: UInt32, reason: String)
    /// An option longer than `NBDLimits.maxOptionLength`; its payload was
    /// skipped without being buffered.
    case tooBig(code: UInt32)

    /// The option number, for the reply header.
    public var code: UInt32 {
        switch self {
        case .exportName: return NBDOptionCode.exportName.rawValue
        case .abort: return NBDOptionCode.abort.rawValue
        case .list: return NBDOptionCode.list.rawValue
        case .info: return NBDOptionCode.info.rawValue
        case .go: return NBDOptionCode.go.rawValue
        case .structuredReply: return NBDOptionCode.structuredReply.rawValue
        case .listMetaContext: return NBDOptionCode.listMetaContext.rawValue
        case .setMetaContext: return NBDOptionCode.setMetaContext.rawValue
        case .unsupported(let code), .invalid(let code, _), .tooBig(let code): return code
        }
    }

    /// Parses the payload of option `code`.
    public init(code: UInt32, payload: ByteBuffer) {
        var payload = payload
        guard let known = NBDOptionCode(rawValue: code) else {
            self = .unsupported(code: code)
            return
        }
        switch known {
        case .exportName:
            // The whole payload is the name; the length check is the caller's
            // (an over-long name here can only be answered by closing).
            self = .exportName(String(decoding: payload.readableBytesView, as: UTF8.self))
        case .abort, .list, .structuredReply:
            guard payload.readableBytes == 0 else {
                self = .invalid(code: code, reason: "option carries no payload, got \(payload.readableBytes) bytes")
                return
            }
            switch known {
            case .abort: self = .abort
            case .list: self = .list
            default: self = .structuredReply
            }
        case .info, .go:
            switch Self.parseInfo(&payload) {
            case .success(let (name, requests)):
                self = known == .info ? .info(exportName: name, requests: requests)
                                      : .go(exportName: name, requests: requests)
            case .failure(let reason):
                self = .invalid(code: code, reason: reason.text)
            }
        case .listMetaContext, .setMetaContext:
            switch Self.parseMetaContext(&payload) {
            case .success(let (name, queries)):
                self = known == .listMetaContext ? .listMetaContext(exportName: name, queries: queries)
                                                 : .setMetaContext(exportName: name, queries: queries)
            case .failure(let reason):
                self = .invalid(code: code, reason: reason.text)
            }
        case .startTLS, .extendedHeaders:
            self = .unsupported(code: code)
        }
    }

    struct ParseFailure: Error { var text: String }

    private static func readString(_ payload: inout ByteBuffer, what: String) -> Result<String, ParseFailure> {
        guard let length = payload.readInteger(as: UInt32.self) else {
            return .failure(ParseFailure(text: "\(what) length missing"))
        }
        guard length <= NBDLimits.maxString else {
            return .failure(ParseFailure(text: "\(what) is \(length) bytes, longer than \(NBDLimits.maxString)"))
        }
        guard let bytes = payload.readSlice(length: Int(length)) else {
            return .failure(ParseFailure(text: "\(what) length \(length) runs past the end of the option"))
        }
        return .success(String(decoding: bytes.readableBytesView, as: UTF8.self))
    }

    private static func parseInfo(_ payload: inout ByteBuffer) -> Result<(String, [UInt16]), ParseFailure> {
        let name: String
        switch readString(&payload, what: "export name") {
        case .success(let value): name = value
        case .failure(let failure): return .failure(failure)
        }
        guard let count = payload.readInteger(as: UInt16.self) else {
            return .failure(ParseFailure(text: "number of information requests missing"))
        }
        guard payload.readableBytes == Int(count) * 2 else {
            return .failure(ParseFailure(text: "\(count) information requests do not fill the option"))
        }
        var requests: [UInt16] = []
        requests.reserveCapacity(Int(count))
        for _ in 0..<count { requests.append(payload.readInteger(as: UInt16.self)!) }
        return .success((name, requests))
    }

    private static func parseMetaContext(_ payload: inout ByteBuffer) -> Result<(String, [String]), ParseFailure> {
        let name: String
        switch readString(&payload, what: "export name") {
        case .success(let value): name = value
        case .failure(let failure): return .failure(failure)
        }
        guard let count = payload.readInteger(as: UInt32.self) else {
            return .failure(ParseFailure(text: "number of queries missing"))
        }
        // Each query needs at least its 4-byte length: bound the count by the
        // bytes present before allocating anything.
        guard Int(count) <= payload.readableBytes / 4 else {
            return .failure(ParseFailure(text: "\(count) queries do not fit in the option"))
        }
        var queries: [String] = []
        for _ in 0..<count {
            switch readString(&payload, what: "query") {
            case .success(let value): queries.append(value)
            case .failure(let failure): return .failure(failure)
            }
        }
        guard payload.readableBytes == 0 else {
            return .failure(ParseFailure(text: "\(payload.readableBytes) stray bytes after the queries"))
        }
        return .success((name, queries))
    }
}
