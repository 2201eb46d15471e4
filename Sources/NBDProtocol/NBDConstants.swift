/// Magic numbers of the NBD wire protocol (all big-endian on the wire).
public enum NBDMagic {
    /// "NBDMAGIC": the first eight bytes a server sends.
    public static let greeting: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": newstyle negotiation, and the prefix of every option.
    public static let option: UInt64 = 0x4948_4156_454f_5054
    /// Prefix of every option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    public static let request: UInt32 = 0x2560_9513
    public static let simpleReply: UInt32 = 0x6744_6698
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Flags the server sends in its greeting.
public struct NBDHandshakeFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client answers the greeting with.
public struct NBDClientFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
    public static let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Per-export transmission flags, sent with the export's size.
public struct NBDTransmissionFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// Option numbers of the negotiation phase.
public enum NBDOptionCode: UInt32, Sendable {
    case exportName = 1
    case abort = 2
    case list = 3
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    case extendedHeaders = 11
}

/// Reply types to options; values with the top bit set are errors.
public enum NBDOptionReplyType: UInt32, Sendable {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsupported = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSRequired = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeRequired = 0x8000_0008
    case errTooBig = 0x8000_0009
}

/// Information items of NBD_OPT_INFO and NBD_OPT_GO.
public enum NBDInfoType: UInt16, Sendable {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Commands of the transmission phase.
public enum NBDCommand: UInt16, Sendable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
}

/// Command flags of the transmission phase.
public struct NBDCommandFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let reqOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
}

/// Structured reply chunk types.
public enum NBDChunkType: UInt16, Sendable {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case error = 0x8001
    case errorOffset = 0x8002
}

/// Structured reply chunk flags.
public struct NBDChunkFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let done = NBDChunkFlags(rawValue: 1 << 0)
}

/// Error values on the wire. They are the Linux errno numbers the protocol
/// names, fixed by the spec whatever the host's errno values are.
public struct NBDError: Error, Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let eperm = NBDError(rawValue: 1)
    public static let eio = NBDError(rawValue: 5)
    public static let enomem = NBDError(rawValue: 12)
    public static let einval = NBDError(rawValue: 22)
    public static let enospc = NBDError(rawValue: 28)
    public static let eoverflow = NBDError(rawValue: 75)
    public static let enotsup = NBDError(rawValue: 95)
    public static let eshutdown = NBDError(rawValue: 108)

    public var description: String {
        switch self {
        case .eperm: return "EPERM"
        case .eio: return "EIO"
        case .enomem: return "ENOMEM"
        case .einval: return "EINVAL"
        case .enospc: return "ENOSPC"
        case .eoverflow: return "EOVERFLOW"
        case .enotsup: return "ENOTSUP"
        case .eshutdown: return "ESHUTDOWN"
        default: return "error \(rawValue)"
        }
    }
}

/// `base:allocation` extent flags.
public struct NBDAllocationFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hole = NBDAllocationFlags(rawValue: 1 << 0)
    public static let zero = NBDAllocationFlags(rawValue: 1 << 1)
}

/// Protocol limits Strata applies.
public enum NBDLimits {
    /// Longest string (export name, description, context name) accepted.
    public static let maxString = 4096
    /// Largest option payload read into memory; larger ones are skipped and
    /// answered with NBD_REP_ERR_TOO_BIG.
    public static let maxOptionLength = 64 * 1024
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    public static let maxPayload = 32 * 1024 * 1024
}
