// Wire constants of the NBD protocol (NetworkBlockDevice `doc/proto.md`, fixed newstyle,
// compact headers) and of QEMU's `qemu:` metadata namespace. All integers on the wire are
// big-endian; NIO's `ByteBuffer` integer helpers default to big-endian.

extension NBD {
    // MARK: Magic numbers

    /// "NBDMAGIC": the first 8 bytes the server sends.
    static let initPasswd: UInt64 = 0x4e42_444d_4147_4943
    /// "IHAVEOPT": second 8 bytes of the newstyle greeting and first 8 bytes of every option.
    static let optionMagic: UInt64 = 0x4948_4156_454F_5054
    /// Magic of every option reply header.
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    /// Magic of a compact transmission request.
    static let requestMagic: UInt32 = 0x2560_9513
    /// Magic of an extended request (extended headers, not negotiated by this server).
    static let extendedRequestMagic: UInt32 = 0x21e4_1c71
    /// Magic of a simple reply.
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    /// Magic of a structured reply chunk.
    static let structuredReplyMagic: UInt32 = 0x668e_33ef

    // MARK: Handshake flags

    /// Server handshake flags.
    static let flagFixedNewstyle: UInt16 = 1 << 0
    static let flagNoZeroes: UInt16 = 1 << 1
    /// Client flags.
    static let clientFlagFixedNewstyle: UInt32 = 1 << 0
    static let clientFlagNoZeroes: UInt32 = 1 << 1

    // MARK: Options

    /// Option codes (`NBD_OPT_*`).
    enum Option: UInt32 {
        case exportName = 1
        case abort = 2
        case list = 3
        case peekExport = 4
        case startTLS = 5
        case info = 6
        case go = 7
        case structuredReply = 8
        case listMetaContext = 9
        case setMetaContext = 10
        case extendedHeaders = 11
    }

    /// Option reply types (`NBD_REP_*`); errors have bit 31 set.
    enum Reply: UInt32 {
        case ack = 1
        case server = 2
        case info = 3
        case metaContext = 4
        case errUnsup = 0x8000_0001
        case errPolicy = 0x8000_0002
        case errInvalid = 0x8000_0003
        case errPlatform = 0x8000_0004
        case errTLSReqd = 0x8000_0005
        case errUnknown = 0x8000_0006
        case errShutdown = 0x8000_0007
        case errBlockSizeReqd = 0x8000_0008
        case errTooBig = 0x8000_0009
        case errExtHeaderReqd = 0x8000_000a
    }

    /// `NBD_INFO_*` types carried by `NBD_REP_INFO`.
    enum Info: UInt16 {
        case export = 0
        case name = 1
        case description = 2
        case blockSize = 3
    }

    // MARK: Transmission

    /// Transmission flags (`NBD_FLAG_*`), sent with the export size.
    struct TransmissionFlags: OptionSet, Sendable {
        let rawValue: UInt16
        static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
        static let readOnly = TransmissionFlags(rawValue: 1 << 1)
        static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
        static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
        static let rotational = TransmissionFlags(rawValue: 1 << 4)
        static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
        static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
        static let sendDF = TransmissionFlags(rawValue: 1 << 7)
        static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
        static let sendResize = TransmissionFlags(rawValue: 1 << 9)
        static let sendCache = TransmissionFlags(rawValue: 1 << 10)
        static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    }

    /// Command types (`NBD_CMD_*`).
    enum Command: UInt16 {
        case read = 0
        case write = 1
        case disc = 2
        case flush = 3
        case trim = 4
        case cache = 5
        case writeZeroes = 6
        case blockStatus = 7
    }

    /// Command flags (`NBD_CMD_FLAG_*`).
    struct CommandFlags: OptionSet, Sendable {
        let rawValue: UInt16
        static let fua = CommandFlags(rawValue: 1 << 0)
        static let noHole = CommandFlags(rawValue: 1 << 1)
        static let df = CommandFlags(rawValue: 1 << 2)
        static let reqOne = CommandFlags(rawValue: 1 << 3)
        static let fastZero = CommandFlags(rawValue: 1 << 4)
        static let payloadLen = CommandFlags(rawValue: 1 << 5)
    }

    /// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
    enum ChunkType: UInt16 {
        case none = 0
        case offsetData = 1
        case offsetHole = 2
        case blockStatus = 5
        case error = 0x8001
        case errorOffset = 0x8002
    }

    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a structured reply.
    static let replyFlagDone: UInt16 = 1

    /// Error values on the wire (`NBD_E*`): fixed numbers, never a host errno.
    public enum ErrorCode: UInt32, Sendable {
        case perm = 1
        case io = 5
        case nomem = 12
        case inval = 22
        case nospc = 28
        case overflow = 75
        case notsup = 95
        case shutdown = 108
    }

    // MARK: Metadata contexts

    /// `base:allocation` status bits.
    static let stateHole: UInt32 = 1 << 0
    static let stateZero: UInt32 = 1 << 1

    /// The metadata contexts this server can select, with the ids it gives them (as qemu-nbd).
    enum MetaContext: UInt32, CaseIterable, Sendable {
        case baseAllocation = 0
        case allocationDepth = 1

        var name: String {
            switch self {
            case .baseAllocation: return "base:allocation"
            case .allocationDepth: return "qemu:allocation-depth"
            }
        }
    }

    // MARK: Limits

    /// Largest string (export name, query, description) accepted from a client.
    static let maxStringLength = 4096
}
