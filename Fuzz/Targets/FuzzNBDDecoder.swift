// libFuzzer target: NBDFrameDecoder on a client byte stream, through the server's code
// path (NIO's ByteToMessageHandler on a channel pipeline; an EmbeddedChannel instead of a
// socket), with the stream split into two reads.
//
// Input: [split][mode] + stream. `split` (× stream length / 255) is where the first read
// ends, so partial frames at every boundary are exercised. `mode` bit 0: the stream starts
// with the 4 client flags (handshake) or directly with options/requests (transmission);
// bit 1: the server's limits, or tiny ones (64-byte options, 1 KiB skipped options,
// 512-byte payloads) so the oversized paths run on short inputs.
//
// It must never trap, and: option data is never longer than the option limit, a WRITE
// carries exactly `length` payload bytes or (above the payload limit) none, and the
// frames never account for more bytes than were sent — a hostile length is skipped or
// rejected, never allocated.
import NIOCore
import NIOEmbedded

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 2 else { return 0 }
    let split = Int(data[0]), mode = data[1]
    let stream = UnsafeBufferPointer(start: data + 2, count: size - 2)
    let small = mode & 2 != 0
    let maxOption: UInt32 = small ? 64 : 8192
    let maxSkipped: UInt32 = small ? 1024 : 1 << 20
    let maxPayload: UInt32 = small ? 512 : 32 << 20
    let decoder = NBDFrameDecoder(expectClientFlags: mode & 1 == 0, maxOptionLength: maxOption,
                                  maxSkippedOptionLength: maxSkipped, maxPayload: maxPayload)
    let channel = EmbeddedChannel()
    do {
        // As NBDServer.childChannelInitializer configures it.
        try channel.pipeline.syncOperations.addHandler(
            ByteToMessageHandler(decoder, maximumBufferSize: Int(maxPayload) + (1 << 20)))
    } catch {
        fatalError("pipeline setup: \(error)")
    }
    let cut = stream.count * split / 255
    var accounted = 0
    var failed = false
    for part in [stream[0..<cut], stream[cut...]] where !failed {
        do {
            try channel.writeInbound(ByteBuffer(bytes: part))
        } catch {
            failed = true  // NBDFrameError: the server closes the connection
        }
        accounted += drain(channel, maxOption: maxOption, maxPayload: maxPayload)
    }
    // EOF (decodeLast after a clean stream) and, always, closing the channel: an
    // EmbeddedChannel left open keeps its pipeline alive (LeakSanitizer reports it).
    _ = try? channel.finish()
    accounted += drain(channel, maxOption: maxOption, maxPayload: maxPayload)
    guard accounted <= stream.count else {
        fatalError("frames account for \(accounted) bytes of a \(stream.count)-byte stream")
    }
    return 0
}

/// Reads every decoded frame, checks its bounds; returns the stream bytes it stands for.
private func drain(_ channel: EmbeddedChannel, maxOption: UInt32, maxPayload: UInt32) -> Int {
    var bytes = 0
    while let frame = try? channel.readInbound(as: NBDFrame.self) {
        switch frame {
        case .clientFlags:
            bytes += 4
        case let .option(_, data):
            guard data.readableBytes <= Int(maxOption) else {
                fatalError("option data of \(data.readableBytes) bytes above the \(maxOption)-byte limit")
            }
            bytes += 16 + data.readableBytes
        case let .oversizedOption(_, length):
            guard length > maxOption else { fatalError("option of \(length) bytes reported as oversized") }
            bytes += 16  // its data is skipped, possibly beyond the input's end
        case let .request(r):
            bytes += 28
            if r.type == NBD.Command.write.rawValue && r.length <= maxPayload {
                guard let p = r.payload, p.readableBytes == Int(r.length) else {
                    fatalError("WRITE of \(r.length) bytes with \(r.payload?.readableBytes ?? -1) payload bytes")
                }
                bytes += p.readableBytes
            } else if let p = r.payload {
                fatalError("payload of \(p.readableBytes) bytes on a request of type \(r.type), length \(r.length)")
            }
        }
    }
    return bytes
}
