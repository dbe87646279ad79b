import QCOW2Format

/// What one layer says about a guest range: the unit in which layers report their mapping
/// to the chain index.
struct LayerPiece: Sendable, Equatable {
    enum Kind: UInt8, Sendable {
        /// Not allocated in this layer: look at the layer below.
        case unallocated
        /// Reads as zeros (zero cluster, or a hole in a raw file).
        case zero
        /// Guest data at `host` in the layer's image file, or its data file.
        case data
        /// Part of a compressed cluster stored at `host` (`compressedSize` bytes).
        case compressed
    }

    var start: UInt64
    var length: UInt64
    var kind: Kind
    /// Host offset of `start` (data, zero-allocated); of the stream (compressed); else `noHost`.
    var host: UInt64
    /// Data lives in the external data file rather than the image file.
    var inDataFile: Bool
    /// Compressed: the stream's sector-rounded size, and the guest offset of its cluster.
    var compressedSize: UInt64 = 0
    var clusterStart: UInt64 = 0

    static let noHost = UInt64.max
    var end: UInt64 { start + length }
    var hasHost: Bool { host != Self.noHost }

    /// Appends, merging with the previous piece when the two are contiguous in guest and host.
    static func append(_ p: LayerPiece, to list: inout [LayerPiece]) {
        guard p.length > 0 else { return }
        if var last = list.last, last.end == p.start, last.kind == p.kind, last.inDataFile == p.inDataFile,
           last.kind != .compressed
        {
            let hostContiguous = (!last.hasHost && !p.hasHost) || (last.hasHost && p.hasHost && last.host + last.length == p.host)
            if hostContiguous {
                last.length += p.length
                list[list.count - 1] = last
                return
            }
        }
        list.append(p)
    }
}
