import NIOCore
import NIOEmbedded
import NIOTestUtils
import Testing
@testable import NBDServer

// Unit tests of the framing decoder (ByteToMessageDecoderVerifier feeds it byte by byte,
// in chunks and all at once) and of the handshake/validation logic of the connection
// handler on an EmbeddedChannel (no sockets, no disk I/O).

private func option(_ code: UInt32, _ data: [UInt8]) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeMultipleIntegers(NBD.optionMagic, code, UInt32(data.count))
    b.writeBytes(data)
    return b
}

private func request(_ type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32,
                     payload: [UInt8]? = nil) -> ByteBuffer {
    var b = ByteBuffer()
    b.writeMultipleIntegers(NBD.requestMagic, flags, type, cookie, offset, length)
    if let payload { b.writeBytes(payload) }
    return b
}

@Suite("NBD frame decoder")
struct DecoderTests {
    @Test("Options and requests decode whatever the read boundaries (ByteToMessageDecoderVerifier)")
    func verifier() throws {
        let payload = (0..<100).map { UInt8($0) }
        let pairs: [(ByteBuffer, [NBDFrame])] = [
            (option(7, [0, 0, 0, 4] + Array("disk".utf8) + [0, 0]),
             [.option(code: 7, data: ByteBuffer(bytes: [0, 0, 0, 4] + Array("disk".utf8) + [0, 0]))]),
            (option(8, []), [.option(code: 8, data: ByteBuffer())]),
            // Larger than maxOptionLength (64): reported, its data skipped.
            (option(99, [UInt8](repeating: 7, count: 200)), [.oversizedOption(code: 99, length: 200)]),
            (request(0, cookie: 1, offset: 4096, length: 512),
             [.request(NBDRequest(flags: 0, type: 0, cookie: 1, offset: 4096, length: 512))]),
            (request(1, flags: 1, cookie: 2, offset: 0, length: 100, payload: payload),
             [.request(NBDRequest(flags: 1, type: 1, cookie: 2, offset: 0, length: 100, payload: ByteBuffer(bytes: payload)))]),
            // A WRITE above maxPayload (1024): the request without payload, the bytes skipped.
            (request(1, cookie: 3, offset: 0, length: 3000, payload: [UInt8](repeating: 1, count: 3000)),
             [.request(NBDRequest(flags: 0, type: 1, cookie: 3, offset: 0, length: 3000))]),
            (request(2, cookie: 4, offset: 0, length: 0), [.request(NBDRequest(flags: 0, type: 2, cookie: 4, offset: 0, length: 0))]),
            // Unknown commands carry no payload in compact form.
            (request(42, cookie: 5, offset: 1, length: 1 << 30),
             [.request(NBDRequest(flags: 0, type: 42, cookie: 5, offset: 1, length: 1 << 30))]),
        ]
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) {
            NBDFrameDecoder(expectClientFlags: false, maxOptionLength: 64, maxSkippedOptionLength: 4096, maxPayload: 1024)
        }
    }

    @Test("Client flags come first, then frames")
    func clientFlags() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(NBDFrameDecoder()))
        var b = ByteBuffer()
        b.writeInteger(UInt32(3))
        b.writeImmutableBuffer(option(8, []))
        try channel.writeInbound(b)
        #expect(try channel.readInbound(as: NBDFrame.self) == .clientFlags(3))
        #expect(try channel.readInbound(as: NBDFrame.self) == .option(code: 8, data: ByteBuffer()))
        _ = try channel.finish()
    }

    @Test("Bad magic and absurd option lengths end the stream")
    func fatalErrors() throws {
        let bad = EmbeddedChannel(handler: ByteToMessageHandler(NBDFrameDecoder(expectClientFlags: false)))
        #expect(throws: NBDFrameError.badMagic(0x1256_0953)) {
            try bad.writeInbound(ByteBuffer(bytes: [0x12, 0x56, 0x09, 0x53] + [UInt8](repeating: 0, count: 24)))
        }
        let badOption = EmbeddedChannel(handler: ByteToMessageHandler(NBDFrameDecoder(expectClientFlags: false)))
        #expect(throws: NBDFrameError.self) {
            try badOption.writeInbound(ByteBuffer(bytes: Array("IHAVEOPX".utf8) + [0, 0, 0, 7, 0, 0, 0, 0]))
        }
        let huge = EmbeddedChannel(handler: ByteToMessageHandler(NBDFrameDecoder(expectClientFlags: false)))
        var b = ByteBuffer()
        b.writeMultipleIntegers(NBD.optionMagic, UInt32(7), UInt32(0xFFFF_FFF0))
        #expect(throws: NBDFrameError.optionTooLarge(0xFFFF_FFF0)) { try huge.writeInbound(b) }
    }
}

/// A handler on an EmbeddedChannel, connected (greeting sent and consumed).
private func handshakeChannel(readOnly: Bool = true, multiConn: Bool = false, size: Int = 1 << 20) throws -> EmbeddedChannel {
    let export = NBDExport(name: "disk", description: "unit", device: MemoryDevice(size: size), readOnly: readOnly)
    var limits = NBDConnectionLimits()
    limits.handshakeTimeout = nil
    let channel = EmbeddedChannel()
    try channel.pipeline.syncOperations.addHandlers([
        ByteToMessageHandler(NBDFrameDecoder()),
        NBDConnectionHandler.standalone(exports: [export], multiConn: multiConn, limits: limits),
    ])
    try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
    var greeting = try #require(try channel.readOutbound(as: ByteBuffer.self))
    #expect(greeting.readMultipleIntegers(as: (UInt64, UInt64, UInt16).self)! == (NBD.initPasswd, NBD.optionMagic, 3))
    var flags = ByteBuffer()
    flags.writeInteger(UInt32(3))
    try channel.writeInbound(flags)
    return channel
}

/// Option replies until the final one: [(type, data)].
private func optionReplies(_ channel: EmbeddedChannel, option code: UInt32) throws -> [(UInt32, ByteBuffer)] {
    var out: [(UInt32, ByteBuffer)] = []
    var stream = ByteBuffer()
    while var b = try channel.readOutbound(as: ByteBuffer.self) { stream.writeBuffer(&b) }
    while let (magic, c, type, length) = stream.readMultipleIntegers(as: (UInt64, UInt32, UInt32, UInt32).self) {
        #expect(magic == NBD.optionReplyMagic)
        #expect(c == code)
        out.append((type, stream.readSlice(length: Int(length)) ?? ByteBuffer()))
    }
    #expect(stream.readableBytes == 0)
    return out
}

private func goData(_ name: String, infos: [UInt16] = [3]) -> [UInt8] {
    var b = ByteBuffer()
    b.writeInteger(UInt32(name.utf8.count))
    b.writeString(name)
    b.writeInteger(UInt16(infos.count))
    for i in infos { b.writeInteger(i) }
    return Array(b.readableBytesView)
}

/// The transmission flags from the INFO_EXPORT reply of a GO.
private func go(_ channel: EmbeddedChannel, name: String = "disk") throws -> UInt16 {
    try channel.writeInbound(option(7, goData(name, infos: [1, 3])))
    let replies = try optionReplies(channel, option: 7)
    #expect(replies.last?.0 == NBD.Reply.ack.rawValue)
    let export = try #require(replies.first { $0.0 == NBD.Reply.info.rawValue && $0.1.getInteger(at: $0.1.readerIndex, as: UInt16.self) == 0 }?.1)
    #expect(export.readableBytes == 12)
    let fields = export.getMultipleIntegers(at: export.readerIndex, as: (UInt16, UInt64, UInt16).self)
    let (_, size, flags) = try #require(fields)
    #expect(size == 1 << 20)
    var block = try #require(replies.first { $0.0 == NBD.Reply.info.rawValue && $0.1.getInteger(at: $0.1.readerIndex, as: UInt16.self) == 3 }?.1)
    #expect(block.readMultipleIntegers(as: (UInt16, UInt32, UInt32, UInt32).self)! == (3, 1, 4096, 32 << 20))
    #expect(replies.contains { $0.0 == NBD.Reply.info.rawValue && $0.1.getInteger(at: $0.1.readerIndex, as: UInt16.self) == 1 })
    return flags
}

@Suite("NBD connection handler (EmbeddedChannel)")
struct HandlerTests {
    @Test("Transmission flags match qemu-nbd's for the same configuration")
    func flags() throws {
        // Read-only, multi-conn, structured replies: qemu-nbd's 0x058f.
        var channel = try handshakeChannel(readOnly: true, multiConn: true)
        try channel.writeInbound(option(8, []))
        #expect(try optionReplies(channel, option: 8).map(\.0) == [NBD.Reply.ack.rawValue])
        #expect(try go(channel) == 0x058f)
        // Writable: 0x0ded; without structured replies 0x0d6d (no DF).
        channel = try handshakeChannel(readOnly: false, multiConn: true)
        try channel.writeInbound(option(8, []))
        _ = try optionReplies(channel, option: 8)
        #expect(try go(channel) == 0x0ded)
        channel = try handshakeChannel(readOnly: false, multiConn: true)
        #expect(try go(channel) == 0x0d6d)
        channel = try handshakeChannel(readOnly: false, multiConn: false)
        #expect(try go(channel, name: "") == 0x0c6d)
    }

    @Test("Unknown and refused options get the right errors and the negotiation goes on")
    func optionErrors() throws {
        let channel = try handshakeChannel()
        for (code, expected) in [(UInt32(5), NBD.Reply.errPolicy), (11, .errUnsup), (4, .errUnsup), (1234, .errUnsup)] {
            try channel.writeInbound(option(code, []))
            let replies = try optionReplies(channel, option: code)
            #expect(replies.count == 1 && replies[0].0 == expected.rawValue, "option \(code)")
        }
        try channel.writeInbound(option(7, goData("other")))
        #expect(try optionReplies(channel, option: 7).map(\.0) == [NBD.Reply.errUnknown.rawValue])
        try channel.writeInbound(option(10, [0, 0, 0, 0, 0, 0, 0, 0]))
        #expect(try optionReplies(channel, option: 10).map(\.0) == [NBD.Reply.errInvalid.rawValue])
        #expect(try go(channel) & 1 == 1)
        #expect(channel.isActive)
    }

    @Test("Requests that fail validation are answered without touching the disk")
    func validation() throws {
        let channel = try handshakeChannel(readOnly: true)
        _ = try go(channel)
        func expectSimpleError(_ buffer: ByteBuffer, cookie: UInt64, _ error: NBD.ErrorCode?,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
            try channel.writeInbound(buffer)
            channel.embeddedEventLoop.run()  // the coalesced flush
            let reply = try #require(try channel.readOutbound(as: ByteBuffer.self))
            let fields = reply.getMultipleIntegers(at: reply.readerIndex, as: (UInt32, UInt32, UInt64).self)
            let (magic, err, ck) = try #require(fields)
            #expect(magic == NBD.simpleReplyMagic, sourceLocation: sourceLocation)
            #expect(err == error?.rawValue ?? 0, sourceLocation: sourceLocation)
            #expect(ck == cookie, sourceLocation: sourceLocation)
        }
        try expectSimpleError(request(0, cookie: 1, offset: (1 << 20) - 10, length: 20), cookie: 1, .inval)
        try expectSimpleError(request(1, cookie: 2, offset: 0, length: 4, payload: [1, 2, 3, 4]), cookie: 2, .perm)
        try expectSimpleError(request(4, cookie: 3, offset: 0, length: 4), cookie: 3, .perm)
        try expectSimpleError(request(77, cookie: 4, offset: 0, length: 4), cookie: 4, .inval)
        try expectSimpleError(request(7, cookie: 5, offset: 0, length: 4), cookie: 5, .inval)
        try expectSimpleError(request(0, flags: 0x4, cookie: 6, offset: 0, length: 4), cookie: 6, .inval)
        try expectSimpleError(request(0, cookie: 7, offset: 0, length: (32 << 20) + 1), cookie: 7, .inval)  // past the end of 1 MiB
        try expectSimpleError(request(5, cookie: 8, offset: 0, length: 4096), cookie: 8, nil)
        #expect(channel.isActive)
    }

    @Test("Client flags with unknown bits, and frames out of phase, close the connection")
    func protocolViolations() throws {
        let export = NBDExport(name: "disk", device: MemoryDevice(size: 4096), readOnly: true)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers([
            ByteToMessageHandler(NBDFrameDecoder()), NBDConnectionHandler.standalone(exports: [export]),
        ])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        var flags = ByteBuffer()
        flags.writeInteger(UInt32(0x10))
        try channel.writeInbound(flags)
        #expect(!channel.isActive)

        let early = try handshakeChannel()
        try early.writeInbound(request(0, cookie: 1, offset: 0, length: 512))
        #expect(!early.isActive)
    }
}
