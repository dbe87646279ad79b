import NIOCore
import NIOPosix
import QCOW2

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The disk side of each command. These functions block (they call the engine) and run
/// only on the server's I/O thread pool. Each returns the complete reply, ready to be
/// written to the socket, or throws; the connection handler turns errors into NBD errors.
enum NBDWork {
    /// An error with a chosen NBD error number.
    struct Failure: Error {
        var code: NBD.ErrorCode
        var message: String
    }

    /// Maps an engine or host error to an NBD error number and a short message.
    static func classify(_ error: any Error) -> (NBD.ErrorCode, String) {
        if let f = error as? Failure { return (f.code, f.message) }
        if error is NIOThreadPoolError.ThreadPoolInactive { return (.shutdown, "server is shutting down") }
        if let q = error as? QCOW2Error {
            switch q {
            case let .io(_, _, code):
                switch code {
                case EPERM, EROFS, EACCES: return (.perm, q.description)
                case ENOSPC, EDQUOT, EFBIG: return (.nospc, q.description)
                case ENOMEM: return (.nomem, q.description)
                default: return (.io, q.description)
                }
            case .invalidArgument:
                return (.inval, q.description)
            default:
                return (.io, q.description)
            }
        }
        return (.io, "\(error)")
    }

    // MARK: READ

    /// A READ reply: simple (header + data), or structured chunks with OFFSET_HOLE for the
    /// ranges the allocation map says read as zeros and OFFSET_DATA for the rest. With `df`
    /// the whole range is one OFFSET_DATA chunk.
    static func read(export: NBDExport, cookie: UInt64, offset: UInt64, length: Int, structured: Bool, df: Bool,
                     allocator: ByteBufferAllocator) throws -> ByteBuffer {
        try read(device: export.device, cookie: cookie, offset: offset, length: length, structured: structured, df: df,
                 allocator: allocator)
    }

    private static func read(device: any NBDDevice, cookie: UInt64, offset: UInt64, length: Int, structured: Bool, df: Bool,
                             allocator: ByteBufferAllocator) throws -> ByteBuffer {
        guard structured else {
            var buffer = allocator.buffer(capacity: 16 + length)
            buffer.writeSimpleReply(error: 0, cookie: cookie)
            try readInto(&buffer, device: device, offset: offset, length: length)
            return buffer
        }
        if length == 0 {
            var buffer = allocator.buffer(capacity: 20)
            buffer.writeChunkHeader(flags: NBD.replyFlagDone, type: .none, cookie: cookie, length: 0)
            return buffer
        }
        var ranges: [(start: UInt64, length: Int, hole: Bool)] = []
        if !df {
            let end = offset + UInt64(length)
            var pos = offset
            for e in try device.allocationMap(offset: offset, length: UInt64(length)) {
                guard e.start == pos, e.length > 0 else { break }
                let n = Int(min(e.end, end) - pos)
                let hole = e.zero
                if let last = ranges.last, last.hole == hole {
                    ranges[ranges.count - 1].length += n
                } else {
                    ranges.append((pos, n, hole))
                }
                pos += UInt64(n)
                if pos >= end { break }
            }
            // The map must cover the range exactly; otherwise send everything as data.
            if pos != end { ranges = [] }
        }
        if ranges.isEmpty { ranges = [(offset, length, false)] }
        let dataBytes = ranges.reduce(0) { $0 + ($1.hole ? 0 : $1.length) }
        var buffer = allocator.buffer(capacity: dataBytes + ranges.count * 32)
        for (i, r) in ranges.enumerated() {
            let flags = i == ranges.count - 1 ? NBD.replyFlagDone : 0
            if r.hole {
                buffer.writeChunkHeader(flags: flags, type: .offsetHole, cookie: cookie, length: 12)
                buffer.writeMultipleIntegers(r.start, UInt32(r.length))
            } else {
                buffer.writeChunkHeader(flags: flags, type: .offsetData, cookie: cookie, length: UInt32(8 + r.length))
                buffer.writeInteger(r.start)
                try readInto(&buffer, device: device, offset: r.start, length: r.length)
            }
        }
        return buffer
    }

    private static func readInto(_ buffer: inout ByteBuffer, device: any NBDDevice, offset: UInt64, length: Int) throws {
        guard length > 0 else { return }
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: length) { raw in
            try device.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<length]))
            return length
        }
    }

    // MARK: Writes

    static func write(export: NBDExport, cookie: UInt64, offset: UInt64, payload: ByteBuffer, fua: Bool,
                      allocator: ByteBufferAllocator) throws -> ByteBuffer {
        let device = export.device
        try payload.withUnsafeReadableBytes { bytes in
            let zero = export.detectZeroes != .off && isAllZero(bytes)
            if zero {
                let unmap = export.detectZeroes == .unmap && export.discard == .unmap
                try device.writeZeroes(at: offset, length: UInt64(bytes.count), unmap: unmap)
            } else {
                try device.write(at: offset, from: bytes)
            }
        }
        if fua { try device.flush() }
        return NBD.successReply(cookie: cookie, allocator: allocator)
    }

    static func writeZeroes(export: NBDExport, cookie: UInt64, offset: UInt64, length: UInt64, noHole: Bool, fastZero: Bool,
                            fua: Bool, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        let device = export.device
        if fastZero, try !zeroingIsFast(export: export, offset: offset, length: length) {
            throw Failure(code: .notsup, message: "zeroing this range needs data writes")
        }
        if length > 0 {
            try device.writeZeroes(at: offset, length: length, unmap: !noHole && export.discard == .unmap)
        }
        if fua { try device.flush() }
        return NBD.successReply(cookie: cookie, allocator: allocator)
    }

    /// True when zeroing the range needs metadata updates only: whole clusters of a qcow2 v3
    /// image, and partial clusters at the ends only where they already read as zeros (the
    /// engine then widens the request to whole clusters, as QEMU does).
    static func zeroingIsFast(export: NBDExport, offset: UInt64, length: UInt64) throws -> Bool {
        guard let alignment = export.fastZeroAlignment, alignment > 0 else { return false }
        guard length > 0 else { return true }
        let end = offset + length
        let size = export.size
        func alreadyZero(_ start: UInt64, _ stop: UInt64) throws -> Bool {
            guard stop > start else { return true }
            return try export.device.allocationMap(offset: start, length: stop - start).allSatisfy { $0.zero }
        }
        let headStart = offset / alignment * alignment
        if headStart != offset, try !alreadyZero(headStart, min(headStart + alignment, size)) { return false }
        if end % alignment != 0, end != size {
            let tailStart = end / alignment * alignment
            if try !alreadyZero(tailStart, min(tailStart + alignment, size)) { return false }
        }
        return true
    }

    static func trim(export: NBDExport, cookie: UInt64, offset: UInt64, length: UInt64, fua: Bool,
                     allocator: ByteBufferAllocator) throws -> ByteBuffer {
        if export.discard == .unmap, length > 0 {
            try export.device.discard(at: offset, length: length)
            if fua { try export.device.flush() }
        }
        return NBD.successReply(cookie: cookie, allocator: allocator)
    }

    static func flush(export: NBDExport, cookie: UInt64, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        if !export.readOnly { try export.device.flush() }
        return NBD.successReply(cookie: cookie, allocator: allocator)
    }

    /// True when every byte is zero (word-at-a-time).
    static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        guard let base = bytes.baseAddress else { return true }
        let count = bytes.count
        var i = 0
        while i < count, (UInt(bitPattern: base + i) & 7) != 0 {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        while i + 8 <= count {
            if base.load(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < count {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }

    // MARK: BLOCK_STATUS

    /// Most extents sent in one status chunk (the spec's recommended bound).
    static let maxExtentsPerChunk = 1 << 20

    /// The status value of an extent in a metadata context.
    static func status(_ e: AllocationExtent, _ context: NBD.MetaContext) -> UInt32 {
        switch context {
        case .baseAllocation:
            return (e.data ? 0 : NBD.stateHole) | (e.zero ? NBD.stateZero : 0)
        case .allocationDepth:
            return e.present ? UInt32(clamping: e.depth + 1) : 0
        }
    }

    /// One `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per selected context, the last with DONE.
    ///
    /// `base:allocation`: HOLE when the range holds no data in any layer, ZERO when it reads
    /// as zeros (qemu-nbd's mapping). `qemu:allocation-depth`: 0 when unallocated in the
    /// whole chain, else 1 + the index of the layer that provides it (1 = top).
    static func blockStatus(export: NBDExport, cookie: UInt64, offset: UInt64, length: UInt64, reqOne: Bool,
                            contexts: [NBD.MetaContext], allocator: ByteBufferAllocator) throws -> ByteBuffer {
        let end = offset + length
        var map: [AllocationExtent]
        if reqOne {
            // Only the first extent of each context is wanted (QEMU asks for up to 2 GiB at a
            // time, extent by extent): map a growing window until every context's first
            // extent ends inside it, instead of the whole range each time.
            var window = min(length, 4 << 20)
            while true {
                map = try export.device.allocationMap(offset: offset, length: window)
                let settled = contexts.allSatisfy { c in
                    guard let first = map.first else { return false }
                    let f = status(first, c)
                    return map.dropFirst().contains { status($0, c) != f }
                }
                if settled || window == length { break }
                window = min(length, window * 8)
            }
        } else {
            map = try export.device.allocationMap(offset: offset, length: length)
        }
        var buffer = allocator.buffer(capacity: 64)
        for (i, context) in contexts.enumerated() {
            var extents: [(length: UInt64, flags: UInt32)] = []
            var pos = offset
            for e in map {
                guard e.start == pos, e.length > 0 else { break }
                let n = min(e.end, end) - pos
                let flags = status(e, context)
                if let last = extents.last, last.flags == flags {
                    extents[extents.count - 1].length += n
                } else {
                    if reqOne && !extents.isEmpty { break }
                    if extents.count == maxExtentsPerChunk { break }
                    extents.append((n, flags))
                }
                pos += n
                if pos >= end { break }
            }
            if reqOne, extents.count > 1 { extents.removeLast(extents.count - 1) }
            if extents.isEmpty {
                // Nothing known (the map did not start at offset): a safe answer.
                extents = [(length, context == .baseAllocation ? 0 : 1)]
            }
            let flags = i == contexts.count - 1 ? NBD.replyFlagDone : 0
            buffer.reserveCapacity(minimumWritableBytes: 24 + 8 * extents.count)
            buffer.writeChunkHeader(flags: flags, type: .blockStatus, cookie: cookie, length: UInt32(4 + 8 * extents.count))
            buffer.writeInteger(context.rawValue)
            for e in extents {
                buffer.writeMultipleIntegers(UInt32(e.length), e.flags)
            }
        }
        return buffer
    }
}
