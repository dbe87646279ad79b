/// An L2 table entry (format doc §4.3–§6): a 64-bit cluster descriptor and, with extended
/// L2 entries, a 64-bit subcluster bitmap (allocation bits 0–31, zero bits 32–63).
public struct L2Entry: Sendable, Hashable {
    public static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    public static let reservedMask: UInt64 = 0x3F00_0000_0000_01FE
    public static let copiedFlag: UInt64 = 1 << 63
    public static let compressedFlag: UInt64 = 1 << 62
    public static let zeroFlag: UInt64 = 1

    public var rawValue: UInt64
    /// Subcluster bitmap (extended L2 only; 0 otherwise).
    public var bitmap: UInt64

    public init(rawValue: UInt64, bitmap: UInt64 = 0) {
        self.rawValue = rawValue
        self.bitmap = bitmap
    }

    public var isCompressed: Bool { rawValue & Self.compressedFlag != 0 }
    public var isCopied: Bool { rawValue & Self.copiedFlag != 0 }
    public var hasZeroFlag: Bool { rawValue & Self.zeroFlag != 0 }
    /// Host offset of a standard cluster (meaningless when compressed).
    public var hostOffset: UInt64 { rawValue & Self.offsetMask }
    public var hasReservedBits: Bool { !isCompressed && rawValue & Self.reservedMask != 0 }

    /// Decodes what a whole cluster is, following QEMU's `qcow2_get_cluster_type`.
    ///
    /// - Parameters:
    ///   - geometry: the image's cluster geometry (for the compressed descriptor width).
    ///   - version: header version (the zero flag is invalid in v2).
    ///   - externalData: the image has an external data file (offset 0 + copied is allocated).
    public func clusterKind(geometry: ClusterGeometry, version: UInt32, externalData: Bool) throws(FormatError) -> ClusterKind {
        if isCompressed {
            if externalData {
                throw .malformed("compressed cluster (L2 entry 0x\(String(rawValue, radix: 16))) in an image with an external data file")
            }
            if geometry.extendedL2 && bitmap != 0 {
                throw .malformed("compressed cluster with non-zero subcluster allocation bitmap 0x\(String(bitmap, radix: 16))")
            }
            return .compressed(try CompressedDescriptor(l2Entry: rawValue, clusterBits: geometry.clusterBits))
        }
        let offset = hostOffset
        if offset & (geometry.clusterSize - 1) != 0 {
            throw .invalidField("L2 entry host offset", value: offset, reason: "data cluster is not properly aligned; L2 entry corrupted")
        }
        if !geometry.extendedL2 && hasZeroFlag {
            guard version >= 3 else {
                throw .malformed("zero cluster entry found in a version 2 image (L2 entry 0x\(String(rawValue, radix: 16)))")
            }
            return offset != 0 ? .zeroAllocated(host: offset) : .zeroPlain
        }
        if offset == 0 && !(externalData && isCopied) {
            return .unallocated
        }
        return .normal(host: offset)
    }

    /// The type of subcluster `index` (0..<32) of an extended L2 entry whose standard part
    /// decodes to `kind`, following QEMU's `qcow2_get_subcluster_type`.
    public func subclusterType(_ index: Int, kind: ClusterKind) -> SubclusterType {
        let alloc = UInt32(truncatingIfNeeded: bitmap)
        let zero = UInt32(truncatingIfNeeded: bitmap >> 32)
        let bit = UInt32(1) << UInt32(index)
        switch kind {
        case .compressed:
            return .compressed
        case .normal, .zeroAllocated:
            if alloc & zero != 0 { return .invalid }
            if zero & bit != 0 { return .zeroAllocated }
            if alloc & bit != 0 { return .normal }
            return .unallocatedAllocated
        case .unallocated, .zeroPlain:
            if alloc != 0 { return .invalid }
            if zero & bit != 0 { return .zeroPlain }
            return .unallocatedPlain
        }
    }
}

/// What a guest cluster maps to, as decoded from its L2 entry.
public enum ClusterKind: Sendable, Hashable {
    /// Read from the backing file (or zeros without one).
    case unallocated
    /// Reads as zeros; no host cluster.
    case zeroPlain
    /// Reads as zeros; a host cluster is reserved.
    case zeroAllocated(host: UInt64)
    /// Guest data at this host offset (in the data file when there is one).
    case normal(host: UInt64)
    /// Deflate or zstd stream inside the image file.
    case compressed(CompressedDescriptor)
}

/// The state of one subcluster of an extended L2 entry.
public enum SubclusterType: Sendable, Hashable {
    case normal, zeroPlain, zeroAllocated, unallocatedPlain, unallocatedAllocated, compressed
    /// A bitmap QEMU considers corrupt (alloc and zero on one subcluster, or alloc bits with no offset).
    case invalid
}

/// A compressed cluster descriptor (format doc §5.1): byte offset and sector count.
public struct CompressedDescriptor: Sendable, Hashable {
    /// Host byte offset where the compressed stream starts (not aligned).
    public let hostOffset: UInt64
    /// Bytes to read from `hostOffset` (sector-rounded; may run past EOF).
    public let compressedSize: UInt64

    public init(hostOffset: UInt64, compressedSize: UInt64) {
        self.hostOffset = hostOffset
        self.compressedSize = compressedSize
    }

    public init(l2Entry raw: UInt64, clusterBits: UInt32) throws(FormatError) {
        let x = UInt64(70 - clusterBits)
        let offset = raw & ((1 << x) - 1)
        let countBits = UInt64(clusterBits - 8)
        let nsect = ((raw >> x) & ((1 << countBits) - 1)) + 1
        guard offset <= QCOW2Limits.maxHostOffset else {
            throw .invalidField("compressed cluster offset", value: offset, reason: "beyond the largest host offset")
        }
        hostOffset = offset
        compressedSize = nsect * 512 - (offset & 511)
    }

    /// Encodes the descriptor bits (without the compressed flag) for a stream of `length` bytes.
    public static func encode(hostOffset: UInt64, length: UInt64, clusterBits: UInt32) -> UInt64 {
        let x = UInt64(70 - clusterBits)
        let nsectAdd = (hostOffset + length - 1) / 512 - hostOffset / 512
        return hostOffset | (nsectAdd << x)
    }
}
