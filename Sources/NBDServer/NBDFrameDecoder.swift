import NIOCore

/// A transmission request (compact, 28-byte form), with the WRITE payload when there is one.
///
/// ```
///  0 magic 0x25609513   4 flags (u16)   6 type (u16)   8 cookie (u64)
/// 16 offset (u64)      24 length (u32) 28 payload (WRITE only, `length` bytes)
/// ```
public struct NBDRequest: Sendable, Equatable {
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// The WRITE payload; nil for other commands and for a WRITE whose payload was too
    /// large to buffer (the decoder skipped it, the handler answers with an error).
    public var payload: ByteBuffer?

    public init(flags: UInt16, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt32, payload: ByteBuffer? = nil) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
    }

    static let headerSize = 28
}

/// What the frame decoder produces.
public enum NBDFrame: Sendable, Equatable {
    /// The 4 client flags that follow the server greeting.
    case clientFlags(UInt32)
    /// An option (`IHAVEOPT`, code, length, data).
    case option(code: UInt32, data: ByteBuffer)
    /// An option whose data exceeded the option limit; the data is being skipped.
    case oversizedOption(code: UInt32, length: UInt32)
    /// A transmission request.
    case request(NBDRequest)
}

/// Errors that end a connection: the byte stream cannot be resynchronised.
public enum NBDFrameError: Error, Equatable, Sendable {
    /// Neither `IHAVEOPT` nor the request magic where a frame must start.
    case badMagic(UInt64)
    /// Option data beyond what the server is willing to skip.
    case optionTooLarge(UInt32)
}

/// Splits the client's byte stream into NBD frames: the 4-byte client flags first, then
/// options (16-byte header + data) and requests (28-byte header + WRITE payload),
/// recognised by their magic. The connection handler enforces which frames are allowed in
/// which phase.
///
/// Memory is bounded: option data above `maxOptionLength` and WRITE payloads above
/// `maxPayload` are not buffered but skipped as they arrive (after the frame is reported
/// with `.oversizedOption` or a request without payload), so a hostile length never makes
/// the server allocate it. Option data above `maxSkippedOptionLength` is a protocol abuse
/// that ends the connection.
public struct NBDFrameDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = NBDFrame

    enum State {
        case clientFlags
        case frames
    }

    private var state: State
    /// Bytes still to be dropped from the stream (oversized option data or WRITE payload).
    private var skipping: UInt64 = 0
    let maxOptionLength: UInt32
    let maxSkippedOptionLength: UInt32
    let maxPayload: UInt32

    /// - Parameter expectClientFlags: false to start directly with options/requests (tests).
    public init(expectClientFlags: Bool = true, maxOptionLength: UInt32 = 8192,
                maxSkippedOptionLength: UInt32 = 1 << 20, maxPayload: UInt32 = 32 << 20) {
        state = expectClientFlags ? .clientFlags : .frames
        self.maxOptionLength = maxOptionLength
        self.maxSkippedOptionLength = maxSkippedOptionLength
        self.maxPayload = maxPayload
    }

    public mutating func decode(buffer: inout ByteBuffer) throws -> NBDFrame? {
        if skipping > 0 {
            let n = Int(min(skipping, UInt64(buffer.readableBytes)))
            buffer.moveReaderIndex(forwardBy: n)
            skipping -= UInt64(n)
            if skipping > 0 { return nil }
        }
        switch state {
        case .clientFlags:
            guard let flags = buffer.readInteger(as: UInt32.self) else { return nil }
            state = .frames
            return .clientFlags(flags)
        case .frames:
            guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt32.self) else { return nil }
            if first == UInt32(truncatingIfNeeded: NBD.optionMagic >> 32) {
                return try decodeOption(&buffer)
            }
            if first == NBD.requestMagic {
                return decodeRequest(&buffer)
            }
            throw NBDFrameError.badMagic(UInt64(first))
        }
    }

    private mutating func decodeOption(_ buffer: inout ByteBuffer) throws -> NBDFrame? {
        guard let (magic, code, length) = buffer.getMultipleIntegers(at: buffer.readerIndex, as: (UInt64, UInt32, UInt32).self)
        else { return nil }
        guard magic == NBD.optionMagic else { throw NBDFrameError.badMagic(magic) }
        if length > maxOptionLength {
            guard length <= maxSkippedOptionLength else { throw NBDFrameError.optionTooLarge(length) }
            buffer.moveReaderIndex(forwardBy: 16)
            skipping = UInt64(length)
            return .oversizedOption(code: code, length: length)
        }
        guard buffer.readableBytes >= 16 + Int(length) else { return nil }
        buffer.moveReaderIndex(forwardBy: 16)
        guard let data = buffer.readSlice(length: Int(length)) else { return nil }
        return .option(code: code, data: data)
    }

    private mutating func decodeRequest(_ buffer: inout ByteBuffer) -> NBDFrame? {
        guard let (_, flags, type, cookie, offset, length) = buffer.getMultipleIntegers(
            at: buffer.readerIndex, as: (UInt32, UInt16, UInt16, UInt64, UInt64, UInt32).self)
        else { return nil }
        var request = NBDRequest(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
        if type == NBD.Command.write.rawValue {
            if length > maxPayload {
                buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
                skipping = UInt64(length)
                return .request(request)
            }
            guard buffer.readableBytes >= NBDRequest.headerSize + Int(length) else { return nil }
            buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
            request.payload = buffer.readSlice(length: Int(length))
            return .request(request)
        }
        buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
        return .request(request)
    }

    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> NBDFrame? {
        // A partial frame at EOF is an abrupt disconnect: nothing to deliver.
        let frame = try decode(buffer: &buffer)
        if frame == nil { buffer.moveReaderIndex(forwardBy: buffer.readableBytes) }
        return frame
    }
}
