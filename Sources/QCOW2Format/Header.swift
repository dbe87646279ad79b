/// The fixed part of a qcow2 header (version 2: 72 bytes; version 3: `header_length` bytes).
///
/// ```
///  0 magic "QFI\xFB"          4 version (2|3)        8 backing_file_offset
/// 16 backing_file_size       20 cluster_bits        24 size (virtual, bytes)
/// 32 crypt_method            36 l1_size             40 l1_table_offset
/// 48 refcount_table_offset   56 refcount_table_clusters
/// 60 nb_snapshots            64 snapshots_offset
/// --- v3 only ---
/// 72 incompatible_features   80 compatible_features 88 autoclear_features
/// 96 refcount_order         100 header_length      104 compression_type (if header_length > 104)
/// ```
/// `parse` performs every structural check QEMU makes at open (`qcow2_do_open`) that
/// does not need the file size; checks against the file size live in the engine.
public struct QCOW2Header: Sendable, Equatable {
    public static let magic: UInt32 = 0x5146_49FB
    public static let v2Length = 72
    public static let v3MinLength = 104
    public static let qemuV3Length = 112

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethodRaw: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var nbSnapshots: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: IncompatibleFeatures
    public var compatibleFeatures: CompatibleFeatures
    public var autoclearFeatures: AutoclearFeatures
    public var refcountOrder: UInt32
    public var headerLength: UInt32
    public var compressionType: CompressionType
    /// Header bytes past the fields we know (from 112 up to `header_length`), kept verbatim.
    public var unknownTrailingFields: [UInt8]

    public var clusterSize: Int { 1 << Int(clusterBits) }
    public var cryptMethod: CryptMethod? { CryptMethod(rawValue: cryptMethodRaw) }
    public var hasExtendedL2: Bool { incompatibleFeatures.contains(.extendedL2) }
    public var hasExternalDataFile: Bool { incompatibleFeatures.contains(.externalDataFile) }
    public var refcountBits: Int { 1 << Int(refcountOrder) }

    /// A fresh header with QEMU's defaults, for creating images.
    public init(version: UInt32 = 3, clusterBits: UInt32 = QCOW2Limits.defaultClusterBits, size: UInt64) {
        self.version = version
        self.backingFileOffset = 0
        self.backingFileSize = 0
        self.clusterBits = clusterBits
        self.size = size
        self.cryptMethodRaw = 0
        self.l1Size = 0
        self.l1TableOffset = 0
        self.refcountTableOffset = 0
        self.refcountTableClusters = 0
        self.nbSnapshots = 0
        self.snapshotsOffset = 0
        self.incompatibleFeatures = []
        self.compatibleFeatures = []
        self.autoclearFeatures = []
        self.refcountOrder = 4
        self.headerLength = version >= 3 ? UInt32(Self.qemuV3Length) : UInt32(Self.v2Length)
        self.compressionType = .deflate
        self.unknownTrailingFields = []
    }

    /// Decodes and validates the fixed header from the first bytes of an image.
    public static func parse(_ bytes: [UInt8]) throws(FormatError) -> QCOW2Header {
        let r = ByteReader(bytes, structure: "qcow2 header")
        let magic = try r.u32(0)
        guard magic == Self.magic else { throw .badMagic(magic) }
        let version = try r.u32(4)
        guard version == 2 || version == 3 else {
            throw .invalidField("version", value: UInt64(version), reason: "only versions 2 and 3 exist")
        }
        var h = QCOW2Header(version: version, size: 0)
        h.backingFileOffset = try r.u64(8)
        h.backingFileSize = try r.u32(16)
        h.clusterBits = try r.u32(20)
        h.size = try r.u64(24)
        h.cryptMethodRaw = try r.u32(32)
        h.l1Size = try r.u32(36)
        h.l1TableOffset = try r.u64(40)
        h.refcountTableOffset = try r.u64(48)
        h.refcountTableClusters = try r.u32(56)
        h.nbSnapshots = try r.u32(60)
        h.snapshotsOffset = try r.u64(64)

        guard (QCOW2Limits.minClusterBits...QCOW2Limits.maxClusterBits).contains(h.clusterBits) else {
            throw .invalidField("cluster_bits", value: UInt64(h.clusterBits), reason: "must be 9..21 (512 B to 2 MiB clusters)")
        }
        let clusterSize = UInt64(1) << UInt64(h.clusterBits)

        if version == 2 {
            h.incompatibleFeatures = []
            h.compatibleFeatures = []
            h.autoclearFeatures = []
            h.refcountOrder = 4
            h.headerLength = UInt32(Self.v2Length)
            h.compressionType = .deflate
        } else {
            h.incompatibleFeatures = IncompatibleFeatures(rawValue: try r.u64(72))
            h.compatibleFeatures = CompatibleFeatures(rawValue: try r.u64(80))
            h.autoclearFeatures = AutoclearFeatures(rawValue: try r.u64(88))
            h.refcountOrder = try r.u32(96)
            h.headerLength = try r.u32(100)
            guard h.headerLength >= Self.v3MinLength else {
                throw .invalidField("header_length", value: UInt64(h.headerLength), reason: "a version 3 header is at least 104 bytes")
            }
            guard UInt64(h.headerLength) <= clusterSize else {
                throw .invalidField("header_length", value: UInt64(h.headerLength), reason: "larger than the cluster size \(clusterSize)")
            }
            guard h.headerLength % 8 == 0 else {
                throw .invalidField("header_length", value: UInt64(h.headerLength), reason: "must be a multiple of 8")
            }
            if h.headerLength > 104 {
                let raw = try r.u8(104)
                guard let type = CompressionType(rawValue: raw) else {
                    throw .invalidField("compression_type", value: UInt64(raw), reason: "unknown compression type")
                }
                h.compressionType = type
            }
            if h.headerLength > UInt32(Self.qemuV3Length) {
                h.unknownTrailingFields = try r.slice(Self.qemuV3Length, Int(h.headerLength) - Self.qemuV3Length)
            }
        }

        guard h.backingFileOffset <= clusterSize else {
            throw .invalidField("backing_file_offset", value: h.backingFileOffset, reason: "must lie inside the first cluster")
        }
        if h.backingFileOffset != 0 {
            guard h.backingFileSize <= QCOW2Limits.maxBackingFileNameLength,
                  UInt64(h.backingFileSize) <= clusterSize - h.backingFileOffset
            else {
                throw .invalidField("backing_file_size", value: UInt64(h.backingFileSize), reason: "backing file name too long")
            }
        }
        let hasCompressionBit = h.incompatibleFeatures.contains(.compressionType)
        if h.compressionType == .deflate && hasCompressionBit {
            throw .invalidField("incompatible_features", value: h.incompatibleFeatures.rawValue, reason: "compression type bit set with deflate compression")
        }
        if h.compressionType != .deflate && !hasCompressionBit {
            throw .invalidField("compression_type", value: UInt64(h.compressionType.rawValue), reason: "compression type incompatible feature bit must be set")
        }
        guard h.refcountOrder <= QCOW2Limits.maxRefcountOrder else {
            throw .invalidField("refcount_order", value: UInt64(h.refcountOrder), reason: "refcount width may be at most 64 bits")
        }
        if h.hasExtendedL2 && h.clusterBits < QCOW2Limits.minClusterBitsExtendedL2 {
            throw .invalidField("cluster_bits", value: UInt64(h.clusterBits), reason: "extended L2 entries need clusters of at least 16 KiB")
        }
        guard h.cryptMethodRaw <= 2 else {
            throw .invalidField("crypt_method", value: UInt64(h.cryptMethodRaw), reason: "unknown encryption method")
        }
        // Refcount table.
        guard h.refcountTableClusters > 0 else {
            throw .invalidField("refcount_table_clusters", value: 0, reason: "image does not contain a reference count table")
        }
        guard UInt64(h.refcountTableClusters) <= QCOW2Limits.maxRefcountTableBytes / clusterSize else {
            throw .invalidField("refcount_table_clusters", value: UInt64(h.refcountTableClusters), reason: "refcount table larger than 8 MiB")
        }
        guard h.refcountTableOffset % clusterSize == 0 else {
            throw .invalidField("refcount_table_offset", value: h.refcountTableOffset, reason: "not cluster aligned")
        }
        guard h.refcountTableOffset <= UInt64(Int64.max) - UInt64(h.refcountTableClusters) * clusterSize else {
            throw .invalidField("refcount_table_offset", value: h.refcountTableOffset, reason: "table would end past the largest file offset")
        }
        // Snapshot table.
        guard h.nbSnapshots <= QCOW2Limits.maxSnapshots else {
            throw .invalidField("nb_snapshots", value: UInt64(h.nbSnapshots), reason: "more than 65536 snapshots")
        }
        guard h.snapshotsOffset % clusterSize == 0 else {
            throw .invalidField("snapshots_offset", value: h.snapshotsOffset, reason: "not cluster aligned")
        }
        guard h.snapshotsOffset <= QCOW2Limits.maxHostOffset else {
            throw .invalidField("snapshots_offset", value: h.snapshotsOffset, reason: "beyond the largest host offset")
        }
        // L1 table.
        guard UInt64(h.l1Size) <= QCOW2Limits.maxL1Entries else {
            throw .invalidField("l1_size", value: UInt64(h.l1Size), reason: "L1 table larger than 32 MiB")
        }
        guard h.l1TableOffset % clusterSize == 0 else {
            throw .invalidField("l1_table_offset", value: h.l1TableOffset, reason: "not cluster aligned")
        }
        guard h.l1TableOffset <= QCOW2Limits.maxHostOffset else {
            throw .invalidField("l1_table_offset", value: h.l1TableOffset, reason: "beyond the largest host offset")
        }
        let geometry = ClusterGeometry(clusterBits: h.clusterBits, extendedL2: h.hasExtendedL2)
        guard let needed = geometry.l1EntriesNeeded(forVirtualSize: h.size), needed <= QCOW2Limits.maxL1Entries else {
            throw .invalidField("size", value: h.size, reason: "virtual size too large for this cluster size")
        }
        guard UInt64(h.l1Size) >= needed else {
            throw .invalidField("l1_size", value: UInt64(h.l1Size), reason: "L1 table is too small for virtual size \(h.size) (needs \(needed) entries)")
        }
        return h
    }

    /// Unknown incompatible bits, named from the feature table when it names them.
    public func unknownIncompatibleFeatureNames(_ table: [FeatureNameEntry]) -> [String] {
        let unknown = incompatibleFeatures.rawValue & ~IncompatibleFeatures.known.rawValue
        guard unknown != 0 else { return [] }
        var names: [String] = []
        for bit in 0..<64 where unknown & (1 << UInt64(bit)) != 0 {
            if let entry = table.first(where: { $0.type == .incompatible && Int($0.bit) == bit }) {
                names.append(entry.name)
            } else {
                names.append("Unknown incompatible feature: \(String(UInt64(1) << UInt64(bit), radix: 16))")
            }
        }
        return names
    }

    /// Serializes the fixed header (72 bytes for v2, `header_length` bytes for v3).
    public func serialize() -> [UInt8] {
        var b: [UInt8] = []
        b.reserveCapacity(Int(headerLength))
        b.appendBE(Self.magic)
        b.appendBE(version)
        b.appendBE(backingFileOffset)
        b.appendBE(backingFileSize)
        b.appendBE(clusterBits)
        b.appendBE(size)
        b.appendBE(cryptMethodRaw)
        b.appendBE(l1Size)
        b.appendBE(l1TableOffset)
        b.appendBE(refcountTableOffset)
        b.appendBE(refcountTableClusters)
        b.appendBE(nbSnapshots)
        b.appendBE(snapshotsOffset)
        if version >= 3 {
            b.appendBE(incompatibleFeatures.rawValue)
            b.appendBE(compatibleFeatures.rawValue)
            b.appendBE(autoclearFeatures.rawValue)
            b.appendBE(refcountOrder)
            b.appendBE(headerLength)
            if headerLength > 104 {
                b.append(compressionType.rawValue)
                b.append(contentsOf: [UInt8](repeating: 0, count: 7))
            }
            b.append(contentsOf: unknownTrailingFields)
            if b.count < Int(headerLength) { b.append(contentsOf: [UInt8](repeating: 0, count: Int(headerLength) - b.count)) }
        }
        return b
    }
}
