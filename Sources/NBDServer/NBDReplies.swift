import NIOCore

// Serialisation of server → client messages into `ByteBuffer`s (big-endian, NIO's default).

extension ByteBuffer {
    /// Option reply header + data:
    /// `NBD_REP_MAGIC`(8) option(4) reply type(4) length(4) data.
    mutating func writeOptionReply(option: UInt32, type: NBD.Reply, data: ByteBuffer? = nil) {
        writeMultipleIntegers(NBD.optionReplyMagic, option, type.rawValue, UInt32(data?.readableBytes ?? 0))
        if var data { writeBuffer(&data) }
    }

    /// Option error reply with a human-readable message.
    mutating func writeOptionError(option: UInt32, type: NBD.Reply, message: String) {
        let text = NBD.truncated(message)
        writeMultipleIntegers(NBD.optionReplyMagic, option, type.rawValue, UInt32(text.utf8.count))
        writeString(text)
    }

    /// Simple reply header: magic(4) error(4) cookie(8); READ data follows on success.
    mutating func writeSimpleReply(error: UInt32, cookie: UInt64) {
        writeMultipleIntegers(NBD.simpleReplyMagic, error, cookie)
    }

    /// Structured reply chunk header: magic(4) flags(2) type(2) cookie(8) length(4).
    mutating func writeChunkHeader(flags: UInt16, type: NBD.ChunkType, cookie: UInt64, length: UInt32) {
        writeMultipleIntegers(NBD.structuredReplyMagic, flags, type.rawValue, cookie, length)
    }

    /// `NBD_REPLY_TYPE_ERROR` chunk with DONE: error(4) message length(2) message.
    mutating func writeErrorChunk(cookie: UInt64, error: NBD.ErrorCode, message: String) {
        let text = NBD.truncated(message)
        let count = text.utf8.count
        writeChunkHeader(flags: NBD.replyFlagDone, type: .error, cookie: cookie, length: UInt32(6 + count))
        writeMultipleIntegers(error.rawValue, UInt16(count))
        writeString(text)
    }
}

extension NBD {
    /// Limit on error messages sent to clients: QEMU reads non-data chunks into a small
    /// buffer and treats an oversized one as fatal for the connection.
    static let maxMessageLength = 200

    /// `message` cut to `maxMessageLength` UTF-8 bytes on a character boundary.
    static func truncated(_ message: String) -> String {
        guard message.utf8.count > maxMessageLength else { return message }
        var out = ""
        var count = 0
        for ch in message {
            let n = String(ch).utf8.count
            if count + n > maxMessageLength { break }
            out.append(ch)
            count += n
        }
        return out
    }

    /// An error reply for `cookie`: a structured error chunk when structured replies were
    /// negotiated, else a simple reply carrying the error number.
    static func errorReply(cookie: UInt64, error: ErrorCode, message: String, structured: Bool,
                           allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 32 + maxMessageLength)
        if structured {
            buffer.writeErrorChunk(cookie: cookie, error: error, message: message)
        } else {
            buffer.writeSimpleReply(error: error.rawValue, cookie: cookie)
        }
        return buffer
    }

    /// A successful reply without data (a simple reply is allowed even after structured
    /// replies were negotiated, as qemu-nbd does).
    static func successReply(cookie: UInt64, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 16)
        buffer.writeSimpleReply(error: 0, cookie: cookie)
        return buffer
    }
}
