import CZlib
import CZstd
import QCOW2Format

/// QEMU-compatible cluster compression (format doc §5.5–5.6).
///
/// - deflate: raw streams (no zlib header). Written with window bits −12, level 6 and
///   memLevel 9, which reproduces QEMU's bytes; read with a 32 KiB window, which accepts
///   any raw stream. The input is sector-rounded, so bytes after the stream are ignored.
/// - zstd: one or more frames, decoded until the cluster is full; trailing bytes ignored.
enum ClusterCodec {
    /// Decompresses exactly `output.count` bytes from `input`; fails if fewer come out.
    static func decompress(_ type: CompressionType, input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer) -> Bool {
        switch type {
        case .deflate: return inflateRaw(input: input, output: output)
        case .zstd: return zstdDecompress(input: input, output: output)
        }
    }

    static func inflateRaw(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer) -> Bool {
        var stream = z_stream()
        guard inflateInit2_(&stream, -15, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return false }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        let rc = inflate(&stream, Z_FINISH)
        // QEMU accepts Z_STREAM_END, or Z_BUF_ERROR once the output buffer is full.
        return (rc == Z_STREAM_END || rc == Z_BUF_ERROR) && stream.avail_out == 0
    }

    static func zstdDecompress(input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let dctx = ZSTD_createDCtx() else { return false }
        defer { ZSTD_freeDCtx(dctx) }
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        var last = 0
        while outBuf.pos < outBuf.size {
            let before = (inBuf.pos, outBuf.pos)
            last = ZSTD_decompressStream(dctx, &outBuf, &inBuf)
            if ZSTD_isError(last) != 0 { return false }
            if (inBuf.pos, outBuf.pos) == before { return false }  // no progress: truncated input
            if last == 0 && outBuf.pos < outBuf.size && inBuf.pos >= inBuf.size { return false }
        }
        // QEMU requires the frame to be completely decoded once the cluster is full.
        return last == 0
    }

    /// Compresses `input` into at most `output.count` bytes; nil when it does not fit
    /// (the caller then writes the cluster uncompressed, as QEMU does).
    static func compress(_ type: CompressionType, input: UnsafeRawBufferPointer, output: UnsafeMutableRawBufferPointer) -> Int? {
        switch type {
        case .deflate:
            var stream = z_stream()
            guard deflateInit2_(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return nil }
            defer { deflateEnd(&stream) }
            stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
            stream.avail_in = uInt(input.count)
            stream.next_out = output.baseAddress?.assumingMemoryBound(to: Bytef.self)
            stream.avail_out = uInt(output.count)
            guard deflate(&stream, Z_FINISH) == Z_STREAM_END else { return nil }
            return output.count - Int(stream.avail_out)
        case .zstd:
            guard let cctx = ZSTD_createCCtx() else { return nil }
            defer { ZSTD_freeCCtx(cctx) }
            var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
            var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
            let rc = ZSTD_compressStream2(cctx, &outBuf, &inBuf, ZSTD_e_end)
            guard rc == 0 else { return nil }
            return outBuf.pos
        }
    }
}
