import NIOCore
import NIOPosix
import QCOW2

/// Limits that bound what one connection may cost the server.
public struct NBDConnectionLimits: Sendable {
    /// Requests dispatched at once (to the thread pool or waiting for their reply to be sent).
    public var maxRequestsInFlight = 16
    /// Bytes of READ replies and WRITE payloads in flight at once (at least one request
    /// always runs, whatever its size).
    public var maxBytesInFlight = 64 << 20
    /// Largest READ or WRITE accepted (also advertised as the maximum block size).
    public var maxPayload: UInt32 = 32 << 20
    /// Largest option accepted into memory; larger ones (up to 1 MiB) are skipped and refused.
    public var maxOptionLength: UInt32 = 8192
    /// Time allowed from connecting to the end of the handshake (nil: unlimited).
    public var handshakeTimeout: TimeAmount? = .seconds(10)

    public init() {}
}

/// One client connection: the handshake, then the transmission phase.
///
/// Runs on the connection's event loop. Requests are queued in arrival order and
/// dispatched to the I/O thread pool while fewer than `maxRequestsInFlight` requests and
/// `maxBytesInFlight` bytes are outstanding; each reply is written as one buffer as soon as
/// its work completes, so replies leave in any order but chunks never interleave. A request
/// stays "in flight" until its reply has been handed to the socket, so a client that stops
/// reading replies stops the server from reading more requests (the handler withholds
/// `read()` from the channel) instead of growing memory.
final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = NBDFrame
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum Phase {
        case awaitingClientFlags
        case negotiating
        case transmission
        case closed
    }

    private let exports: [NBDExport]
    private let pool: NIOThreadPool
    private let multiConn: Bool
    private let limits: NBDConnectionLimits
    private let log: (@Sendable (String) -> Void)?

    private var phase = Phase.awaitingClientFlags
    private var clientNoZeroes = false
    private var structured = false
    /// The export named by the last SET_META_CONTEXT and what it selected.
    private var metaExportIndex: Int?
    private var metaContexts: [NBD.MetaContext] = []
    private var handshakeTimer: Scheduled<Void>?

    // Transmission state.
    private var exportIndex = 0
    private var pending = CircularBuffer<NBDRequest>()
    private var inFlight = 0
    private var inFlightBytes = 0
    private var readWithheld = false
    private var disconnecting = false
    /// True while `pump` runs: replies completing synchronously inside it must not re-enter.
    private var pumping = false
    /// A flush of the replies written so far is queued on the event loop.
    private var flushScheduled = false

    init(exports: [NBDExport], pool: NIOThreadPool, multiConn: Bool, limits: NBDConnectionLimits,
         log: (@Sendable (String) -> Void)? = nil) {
        self.exports = exports
        self.pool = pool
        self.multiConn = multiConn
        self.limits = limits
        self.log = log
    }

    // MARK: Channel events

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: 18)
        greeting.writeMultipleIntegers(NBD.initPasswd, NBD.optionMagic, NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        if let timeout = limits.handshakeTimeout {
            handshakeTimer = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [self] in
                guard phase == .awaitingClientFlags || phase == .negotiating else { return }
                log?("handshake timed out")
                close(context)
            }
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        phase = .closed
        pending.removeAll()
        handshakeTimer?.cancel()
        handshakeTimer = nil
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if phase != .closed { log?("closing connection: \(error)") }
        close(context)
    }

    func read(context: ChannelHandlerContext) {
        if phase == .transmission, !pending.isEmpty || atCapacity {
            readWithheld = true
            return
        }
        context.read()
    }

    private var atCapacity: Bool {
        inFlight >= limits.maxRequestsInFlight || inFlightBytes >= limits.maxBytesInFlight
    }

    private func close(_ context: ChannelHandlerContext) {
        guard phase != .closed else { return }
        phase = .closed
        pending.removeAll()
        handshakeTimer?.cancel()
        handshakeTimer = nil
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch (phase, frame) {
        case (.closed, _):
            return
        case let (.awaitingClientFlags, .clientFlags(flags)):
            // Unknown bits, or bits the server did not offer: the spec says drop the connection.
            guard flags & ~(NBD.clientFlagFixedNewstyle | NBD.clientFlagNoZeroes) == 0 else {
                log?("client flags 0x\(String(flags, radix: 16)) contain unknown bits")
                return close(context)
            }
            clientNoZeroes = flags & NBD.clientFlagNoZeroes != 0
            phase = .negotiating
        case let (.negotiating, .option(code, data)):
            handleOption(context, code: code, data: data)
        case let (.negotiating, .oversizedOption(code, length)):
            if code == NBD.Option.exportName.rawValue { return close(context) }
            sendOptionError(context, option: code, .errTooBig, "option data of \(length) bytes is too large")
        case let (.transmission, .request(request)):
            guard !disconnecting else { return }
            pending.append(request)
            pump(context)
        default:
            log?("protocol violation: unexpected frame in phase \(phase)")
            close(context)
        }
    }

    // MARK: Handshake

    private func findExport(_ name: [UInt8]) -> Int? {
        if let i = exports.firstIndex(where: { Array($0.name.utf8) == name }) { return i }
        return name.isEmpty && !exports.isEmpty ? 0 : nil
    }

    /// Transmission flags of an export, as sent at GO/INFO/EXPORT_NAME time.
    private func transmissionFlags(_ export: NBDExport) -> UInt16 {
        var f: NBD.TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendCache]
        if export.readOnly {
            f.insert(.readOnly)
        } else {
            f.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structured { f.insert(.sendDF) }
        if multiConn { f.insert(.canMultiConn) }
        return f.rawValue
    }

    private func send(_ context: ChannelHandlerContext, _ buffer: ByteBuffer) {
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
    }

    private func sendOptionReply(_ context: ChannelHandlerContext, option: UInt32, _ type: NBD.Reply, _ data: ByteBuffer? = nil) {
        var b = context.channel.allocator.buffer(capacity: 20 + (data?.readableBytes ?? 0))
        b.writeOptionReply(option: option, type: type, data: data)
        send(context, b)
    }

    private func sendOptionError(_ context: ChannelHandlerContext, option: UInt32, _ type: NBD.Reply, _ message: String) {
        var b = context.channel.allocator.buffer(capacity: 20 + message.utf8.count)
        b.writeOptionError(option: option, type: type, message: message)
        send(context, b)
    }

    private func handleOption(_ context: ChannelHandlerContext, code: UInt32, data: ByteBuffer) {
        guard let option = NBD.Option(rawValue: code) else {
            return sendOptionError(context, option: code, .errUnsup, "option \(code) is not supported")
        }
        switch option {
        case .exportName:
            var d = data
            let name = d.readBytes(length: d.readableBytes) ?? []
            guard name.count <= NBD.maxStringLength, let index = findExport(name) else {
                log?("EXPORT_NAME for an unknown export; closing")
                return close(context)
            }
            enterTransmission(context, exportIndex: index)
            let export = exports[index]
            var b = context.channel.allocator.buffer(capacity: 134)
            b.writeMultipleIntegers(export.size, transmissionFlags(export))
            if !clientNoZeroes { b.writeRepeatingByte(0, count: 124) }
            send(context, b)
        case .abort:
            var b = context.channel.allocator.buffer(capacity: 20)
            b.writeOptionReply(option: code, type: .ack)
            let promise = context.eventLoop.makePromise(of: Void.self)
            context.writeAndFlush(wrapOutboundOut(b), promise: promise)
            promise.futureResult.assumeIsolated().whenComplete { [self] _ in close(context) }
        case .list:
            guard data.readableBytes == 0 else {
                return sendOptionError(context, option: code, .errInvalid, "NBD_OPT_LIST takes no data")
            }
            for export in exports {
                var d = context.channel.allocator.buffer(capacity: 4 + export.name.utf8.count)
                d.writeInteger(UInt32(export.name.utf8.count))
                d.writeString(export.name)
                if let text = export.description { d.writeString(text) }
                sendOptionReply(context, option: code, .server, d)
            }
            sendOptionReply(context, option: code, .ack)
        case .info, .go:
            handleInfo(context, code: code, data: data, go: option == .go)
        case .structuredReply:
            guard data.readableBytes == 0 else {
                return sendOptionError(context, option: code, .errInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            guard !structured else {
                return sendOptionError(context, option: code, .errInvalid, "structured replies already negotiated")
            }
            structured = true
            sendOptionReply(context, option: code, .ack)
        case .listMetaContext, .setMetaContext:
            handleMetaContext(context, code: code, data: data, set: option == .setMetaContext)
        case .startTLS:
            sendOptionError(context, option: code, .errPolicy, "TLS is not configured on this server")
        case .peekExport, .extendedHeaders:
            sendOptionError(context, option: code, .errUnsup, "option \(code) is not supported")
        }
    }

    /// NBD_OPT_INFO / NBD_OPT_GO: name length(4) name info count(2) info types(2 each).
    private func handleInfo(_ context: ChannelHandlerContext, code: UInt32, data: ByteBuffer, go: Bool) {
        var d = data
        guard let nameLength = d.readInteger(as: UInt32.self), nameLength <= NBD.maxStringLength,
              Int(nameLength) + 2 <= d.readableBytes,
              let name = d.readBytes(length: Int(nameLength)),
              let count = d.readInteger(as: UInt16.self), d.readableBytes == Int(count) * 2
        else {
            return sendOptionError(context, option: code, .errInvalid, "malformed NBD_OPT_INFO/GO request")
        }
        var requested = Set<UInt16>()
        for _ in 0..<count { if let t = d.readInteger(as: UInt16.self) { requested.insert(t) } }
        guard let index = findExport(name) else {
            return sendOptionError(context, option: code, .errUnknown, "export not found")
        }
        let export = exports[index]
        let allocator = context.channel.allocator
        func info(_ type: NBD.Info, _ body: (inout ByteBuffer) -> Void) {
            var b = allocator.buffer(capacity: 16)
            b.writeInteger(type.rawValue)
            body(&b)
            sendOptionReply(context, option: code, .info, b)
        }
        // As qemu-nbd: the description even when not asked for, the block sizes always.
        if let text = export.description {
            info(.description) { $0.writeString(text) }
        }
        if requested.contains(NBD.Info.name.rawValue) {
            info(.name) { $0.writeString(export.name) }
        }
        info(.blockSize) { $0.writeMultipleIntegers(UInt32(1), export.preferredBlockSize, limits.maxPayload) }
        info(.export) { $0.writeMultipleIntegers(export.size, transmissionFlags(export)) }
        sendOptionReply(context, option: code, .ack)
        if go { enterTransmission(context, exportIndex: index) }
    }

    /// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT: name length(4) name query count(4)
    /// then per query: length(4) query.
    private func handleMetaContext(_ context: ChannelHandlerContext, code: UInt32, data: ByteBuffer, set: Bool) {
        if set {
            // SET replaces the selection even when it fails.
            metaContexts = []
            metaExportIndex = nil
        }
        guard structured else {
            return sendOptionError(context, option: code, .errInvalid, "structured replies must be negotiated first")
        }
        var d = data
        guard let nameLength = d.readInteger(as: UInt32.self), nameLength <= NBD.maxStringLength,
              let name = d.readBytes(length: Int(nameLength)),
              let count = d.readInteger(as: UInt32.self)
        else {
            return sendOptionError(context, option: code, .errInvalid, "malformed metadata context request")
        }
        var queries: [[UInt8]] = []
        for _ in 0..<count {
            guard let length = d.readInteger(as: UInt32.self), length <= NBD.maxStringLength,
                  let query = d.readBytes(length: Int(length))
            else {
                return sendOptionError(context, option: code, .errInvalid, "malformed metadata context query")
            }
            queries.append(query)
        }
        guard d.readableBytes == 0 else {
            return sendOptionError(context, option: code, .errInvalid, "trailing bytes in metadata context request")
        }
        guard let index = findExport(name) else {
            return sendOptionError(context, option: code, .errUnknown, "export not found")
        }
        let available = exports[index].contexts
        var selected: [NBD.MetaContext] = []
        func add(_ c: NBD.MetaContext) { if !selected.contains(c) { selected.append(c) } }
        if !set && queries.isEmpty {
            available.forEach(add)
        }
        for query in queries {
            let text = String(decoding: query, as: UTF8.self)
            if let exact = available.first(where: { Array($0.name.utf8) == query }) {
                add(exact)
            } else if !set, text == "base:" || text == "qemu:" {
                // Namespace wildcards list every context of the namespace (LIST only).
                available.filter { $0.name.hasPrefix(text) }.forEach(add)
            }
        }
        let allocator = context.channel.allocator
        for c in selected {
            var b = allocator.buffer(capacity: 4 + c.name.utf8.count)
            b.writeInteger(set ? c.rawValue : 0)
            b.writeString(c.name)
            sendOptionReply(context, option: code, .metaContext, b)
        }
        sendOptionReply(context, option: code, .ack)
        if set {
            metaContexts = selected
            metaExportIndex = index
        }
    }

    private func enterTransmission(_ context: ChannelHandlerContext, exportIndex index: Int) {
        phase = .transmission
        exportIndex = index
        handshakeTimer?.cancel()
        handshakeTimer = nil
        if metaExportIndex != index { metaContexts = [] }
    }

    // MARK: Transmission

    /// Bytes a request holds while in flight (READ reply data or WRITE payload).
    private func cost(_ r: NBDRequest) -> Int {
        switch NBD.Command(rawValue: r.type) {
        case .read: return r.length <= limits.maxPayload ? Int(r.length) : 0
        case .write: return r.payload?.readableBytes ?? 0
        default: return 0
        }
    }

    /// Dispatches queued requests while capacity allows, resumes reading when the queue has
    /// drained, and closes after NBD_CMD_DISC once everything has been answered.
    private func pump(_ context: ChannelHandlerContext) {
        guard phase == .transmission, !pumping else { return }
        pumping = true
        defer { pumping = false }
        while let next = pending.first, !disconnecting {
            let c = cost(next)
            if inFlight > 0, inFlight >= limits.maxRequestsInFlight || inFlightBytes + c > limits.maxBytesInFlight { break }
            pending.removeFirst()
            dispatch(context, next, cost: c)
        }
        if disconnecting {
            if inFlight == 0 { close(context) }
            return
        }
        if readWithheld, pending.isEmpty, !atCapacity {
            readWithheld = false
            context.read()
        }
    }

    private func dispatch(_ context: ChannelHandlerContext, _ r: NBDRequest, cost: Int) {
        let export = exports[exportIndex]
        let allocator = context.channel.allocator
        let structured = self.structured
        let cookie = r.cookie
        let flags = NBD.CommandFlags(rawValue: r.flags)
        let size = export.size
        let inRange = r.offset <= size && UInt64(r.length) <= size - r.offset

        func fail(_ code: NBD.ErrorCode, _ message: String) {
            inFlight += 1
            finish(context, NBD.errorReply(cookie: cookie, error: code, message: message, structured: structured,
                                           allocator: allocator), cost: 0)
        }

        guard let command = NBD.Command(rawValue: r.type) else {
            return fail(.inval, "unknown command \(r.type)")
        }
        var allowed: NBD.CommandFlags = [.fua]
        switch command {
        case .read: if structured { allowed.insert(.df) }
        case .writeZeroes:
            allowed.insert(.noHole)
            if !export.readOnly { allowed.insert(.fastZero) }
        case .blockStatus: allowed.insert(.reqOne)
        case .disc: allowed = flags
        default: break
        }
        guard allowed.isSuperset(of: flags) else {
            return fail(.inval, "invalid flags 0x\(String(r.flags, radix: 16)) for command \(r.type)")
        }
        let offset = r.offset
        let length = r.length
        let fua = flags.contains(.fua)
        let work: @Sendable () throws -> ByteBuffer
        switch command {
        case .disc:
            disconnecting = true
            pending.removeAll()
            return
        case .read:
            guard inRange else { return fail(.inval, "read past the end of the export") }
            guard length <= limits.maxPayload else { return fail(.overflow, "read larger than the maximum block size") }
            let df = flags.contains(.df)
            work = { try NBDWork.read(export: export, cookie: cookie, offset: offset, length: Int(length),
                                      structured: structured, df: df, allocator: allocator) }
        case .write:
            guard let payload = r.payload else { return fail(.inval, "write larger than the maximum block size") }
            guard !export.readOnly else { return fail(.perm, "export is read-only") }
            guard inRange else { return fail(.nospc, "write past the end of the export") }
            work = { try NBDWork.write(export: export, cookie: cookie, offset: offset, payload: payload, fua: fua,
                                       allocator: allocator) }
        case .flush:
            work = { try NBDWork.flush(export: export, cookie: cookie, allocator: allocator) }
        case .trim:
            guard !export.readOnly else { return fail(.perm, "export is read-only") }
            guard inRange else { return fail(.inval, "trim past the end of the export") }
            work = { try NBDWork.trim(export: export, cookie: cookie, offset: offset, length: UInt64(length), fua: fua,
                                      allocator: allocator) }
        case .writeZeroes:
            guard !export.readOnly else { return fail(.perm, "export is read-only") }
            guard inRange else { return fail(.nospc, "write past the end of the export") }
            let noHole = flags.contains(.noHole), fastZero = flags.contains(.fastZero)
            work = { try NBDWork.writeZeroes(export: export, cookie: cookie, offset: offset, length: UInt64(length),
                                             noHole: noHole, fastZero: fastZero, fua: fua, allocator: allocator) }
        case .cache:
            guard inRange else { return fail(.inval, "cache request past the end of the export") }
            inFlight += 1
            return finish(context, NBD.successReply(cookie: cookie, allocator: allocator), cost: 0)
        case .blockStatus:
            guard structured, !metaContexts.isEmpty else {
                return fail(.inval, "no metadata context was negotiated")
            }
            guard length > 0 else { return fail(.inval, "block status of an empty range") }
            guard inRange else { return fail(.inval, "block status past the end of the export") }
            let contexts = metaContexts
            let reqOne = flags.contains(.reqOne)
            work = { try NBDWork.blockStatus(export: export, cookie: cookie, offset: offset, length: UInt64(length),
                                             reqOne: reqOne, contexts: contexts, allocator: allocator) }
        }
        inFlight += 1
        inFlightBytes += cost
        let log = self.log
        pool.runIfActive(eventLoop: context.eventLoop) { () -> ByteBuffer in
            do {
                return try work()
            } catch {
                let (code, message) = NBDWork.classify(error)
                log?("command \(command) at \(offset)+\(length) failed: \(message)")
                return NBD.errorReply(cookie: cookie, error: code, message: message, structured: structured, allocator: allocator)
            }
        }.assumeIsolated().whenComplete { [self] result in
            switch result {
            case let .success(reply):
                finish(context, reply, cost: cost)
            case let .failure(error):
                let (code, message) = NBDWork.classify(error)
                finish(context, NBD.errorReply(cookie: cookie, error: code, message: message, structured: structured,
                                               allocator: allocator), cost: cost)
            }
        }
    }

    /// Sends a reply; the request stops counting as in flight once the socket took it.
    private func finish(_ context: ChannelHandlerContext, _ reply: ByteBuffer, cost: Int) {
        guard phase != .closed else {
            inFlight -= 1
            inFlightBytes -= cost
            return
        }
        let promise = context.eventLoop.makePromise(of: Void.self)
        context.write(wrapOutboundOut(reply), promise: promise)
        // One flush (one writev) for the replies that complete in the same loop iteration.
        if !flushScheduled {
            flushScheduled = true
            context.eventLoop.assumeIsolated().execute { [self] in
                flushScheduled = false
                if phase != .closed { context.flush() }
            }
        }
        promise.futureResult.assumeIsolated().whenComplete { [self] _ in
            inFlight -= 1
            inFlightBytes -= cost
            pump(context)
        }
    }
}

extension NBDConnectionHandler {
    /// A pool for handlers created outside a server (unit tests drive the handshake and
    /// request validation through an `EmbeddedChannel`).
    static let standalonePool: NIOThreadPool = {
        let pool = NIOThreadPool(numberOfThreads: 1)
        pool.start()
        return pool
    }()

    /// A handler that is not attached to an `NBDServer`.
    static func standalone(exports: [NBDExport], multiConn: Bool = false,
                           limits: NBDConnectionLimits = NBDConnectionLimits()) -> NBDConnectionHandler {
        NBDConnectionHandler(exports: exports, pool: standalonePool, multiConn: multiConn, limits: limits)
    }
}
