import QCOW2Format

/// Options of `qcow2 create` / `qemu-img create -f qcow2`, with QEMU's defaults.
public struct CreateOptions: Sendable {
    public var size: UInt64
    public var clusterSize: UInt64 = 65536
    /// "1.1" (version 3, default) or "0.10" (version 2).
    public var compat: String = "1.1"
    public var lazyRefcounts = false
    public var refcountBits = 16
    public var extendedL2 = false
    public var compressionType: CompressionType = .deflate
    public var backingFile: String?
    public var backingFormat: String?
    public var dataFile: String?
    public var dataFileRaw = false
    public var preallocation = "off"
    /// Encrypt the image with LUKS (nil: plain).
    public var encryption: EncryptionCreateOptions?

    public init(size: UInt64) { self.size = size }
}

/// Creates empty qcow2 images laid out exactly as `qemu-img create` lays them out:
/// cluster 0 header, cluster 1 refcount table, cluster 2 refcount block, then the L1 table
/// (only `l1_size * 8` bytes written), allocated through the same refcount code as writes.
public enum ImageCreator {
    public static func create(path: String, options o: CreateOptions) throws {
        let (version, clusterBits, size, l1Entries) = try o.validated()
        var h = QCOW2Header(version: version, clusterBits: clusterBits, size: size)
        h.refcountOrder = UInt32(o.refcountBits.trailingZeroBitCount)
        if o.lazyRefcounts { h.compatibleFeatures.insert(.lazyRefcounts) }
        if o.extendedL2 { h.incompatibleFeatures.insert(.extendedL2) }
        if o.compressionType != .deflate {
            h.compressionType = o.compressionType
            h.incompatibleFeatures.insert(.compressionType)
        }
        if o.dataFile != nil { h.incompatibleFeatures.insert(.externalDataFile) }
        if o.dataFileRaw { h.autoclearFeatures.insert(.dataFileRaw) }
        h.refcountTableOffset = o.clusterSize
        h.refcountTableClusters = 1
        var extensions: [HeaderExtension] = []
        if let f = o.backingFormat, o.backingFile != nil { extensions.append(.backingFormat(f)) }
        if let d = o.dataFile { extensions.append(.externalDataFile(d)) }
        if version >= 3 && o.clusterSize > 4096 { extensions.append(.featureNameTable(FeatureNameEntry.qemuDefault)) }
        var image = ImageHeader(header: h, extensions: extensions, backingFileName: o.backingFile)
        guard var cluster0 = image.serializeCluster0() else {
            throw QCOW2Error.invalidArgument("header extensions and backing file name do not fit in one cluster")
        }

        let file = try FileHandle(creating: path)
        cluster0.append(contentsOf: [UInt8](repeating: 0, count: Int(o.clusterSize) - cluster0.count))
        try file.write(cluster0, at: 0)
        // Refcount table (cluster 1) pointing at the refcount block (cluster 2), which counts
        // clusters 0, 1 and 2.
        var reftable = [UInt8](repeating: 0, count: Int(o.clusterSize))
        reftable.putBE(2 * o.clusterSize, at: 0)
        try file.write(reftable, at: o.clusterSize)
        var block = [UInt8](repeating: 0, count: Int(o.clusterSize))
        let codec = RefcountBlockCodec(order: h.refcountOrder)
        block.withUnsafeMutableBytes { raw in
            for c in 0..<3 { codec.set(raw, c, 1) }
        }
        try file.write(block, at: 2 * o.clusterSize)

        // The L1 table, allocated like any other cluster (first fit: cluster 3 normally).
        let refcounts = try RefcountManager(file: file, header: h) { offset, clusters in
            var pair: [UInt8] = []
            pair.appendBE(offset)
            pair.appendBE(clusters)
            try file.write(pair, at: 48)
        }
        let l1Bytes = l1Entries * 8
        if l1Entries > 0 {
            let clusters = (l1Bytes + o.clusterSize - 1) / o.clusterSize
            let l1Offset = try refcounts.allocate(clusters: clusters)
            try file.write([UInt8](repeating: 0, count: Int(l1Bytes)), at: l1Offset)
            image.header.l1TableOffset = l1Offset
        }
        if let encryption = o.encryption {
            try writeEncryptionArea(encryption, file: file, refcounts: refcounts, clusterSize: o.clusterSize, path: path, image: &image)
        }
        try refcounts.writeDirtyBlocks()
        image.header.l1Size = UInt32(l1Entries)
        image.header.refcountTableOffset = refcounts.tableOffset
        image.header.refcountTableClusters = refcounts.tableClusters
        guard let final0 = image.serializeCluster0() else {
            throw QCOW2Error.invalidArgument("header does not fit in one cluster")
        }
        try file.write(final0, at: 0)
        if let d = o.dataFile {
            let data = try FileHandle(creating: Paths.resolve(d, relativeTo: path))
            try data.truncate(to: size)
            try data.sync()
        }
        try file.sync()
        // data-file-raw means the data file must be a complete raw image: QEMU then
        // preallocates the metadata.
        let prealloc = o.dataFileRaw && o.preallocation == "off" ? "metadata" : o.preallocation
        if prealloc != "off" {
            var options = OpenOptions(format: "qcow2", writable: true)
            options.followBackingFiles = false
            options.secrets.fallback = o.encryption?.passphrase
            let disk = try DiskImage.open(path: path, options: options)
            try disk.preallocate(mode: prealloc)
            try disk.close()
        }
    }
}

/// Raw images: a sparse file of the virtual size.
public enum RawImage {
    public static func create(path: String, size: UInt64) throws {
        let f = try FileHandle(creating: path)
        try f.truncate(to: size)
        // Like QEMU's file driver, allocate the first block (it makes alignment probing cheap).
        if size > 0 { try f.write([UInt8](repeating: 0, count: Int(min(size, 4096))), at: 0) }
        try f.sync()
    }
}

extension CreateOptions {
    /// Checks the options as `qemu-img create` (and `measure`) do; returns the header
    /// version, cluster bits, virtual size rounded to 512 and the L1 size.
    public func validated(requireBackingFormat: Bool = true) throws -> (version: UInt32, clusterBits: UInt32, size: UInt64, l1Entries: UInt64) {
        let o = self
        let clusterBits = UInt32(o.clusterSize.trailingZeroBitCount)
        guard o.clusterSize.nonzeroBitCount == 1, (QCOW2Limits.minClusterBits...QCOW2Limits.maxClusterBits).contains(clusterBits) else {
            throw QCOW2Error.invalidArgument("Cluster size must be a power of two between 512 and 2048k")
        }
        let version: UInt32
        switch o.compat {
        case "1.1", "v3": version = 3
        case "0.10", "v2": version = 2
        default: throw QCOW2Error.invalidArgument("Invalid compatibility level: '\(o.compat)'")
        }
        guard o.refcountBits > 0, o.refcountBits <= 64, o.refcountBits.nonzeroBitCount == 1 else {
            throw QCOW2Error.invalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
        }
        if version == 2 {
            if o.lazyRefcounts { throw QCOW2Error.invalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)") }
            if o.refcountBits != 16 { throw QCOW2Error.invalidArgument("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)") }
            if o.extendedL2 { throw QCOW2Error.invalidArgument("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)") }
            if o.compressionType != .deflate { throw QCOW2Error.invalidArgument("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)") }
            if o.dataFile != nil { throw QCOW2Error.invalidArgument("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)") }
        }
        if o.extendedL2 && clusterBits < QCOW2Limits.minClusterBitsExtendedL2 {
            throw QCOW2Error.invalidArgument("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        }
        guard ["off", "metadata", "falloc", "full"].contains(o.preallocation) else {
            throw QCOW2Error.invalidArgument("Invalid preallocation mode: '\(o.preallocation)'")
        }
        if o.dataFileRaw {
            guard o.dataFile != nil else { throw QCOW2Error.invalidArgument("data-file-raw requires data-file") }
            guard o.backingFile == nil else { throw QCOW2Error.invalidArgument("Backing file and data-file-raw cannot be used at the same time") }
        }
        if o.preallocation != "off" && o.backingFile != nil {
            throw QCOW2Error.invalidArgument("Backing file and preallocation can only be used at the same time if extended_l2 is on")
        }
        if requireBackingFormat && o.backingFile != nil && o.backingFormat == nil {
            throw QCOW2Error.invalidArgument("Backing file specified without backing format")
        }
        if let f = o.backingFormat, f.utf8.count > QCOW2Limits.maxBackingFormatLength {
            throw QCOW2Error.invalidArgument("backing format '\(f)' is too long")
        }
        if let b = o.backingFile, b.utf8.count > Int(QCOW2Limits.maxBackingFileNameLength) {
            throw QCOW2Error.invalidArgument("backing file name is too long (at most 1023 bytes)")
        }
        // QEMU works in 512-byte sectors: round the size up.
        let (rounded, overflow) = o.size.addingReportingOverflow(511)
        guard !overflow else { throw QCOW2Error.invalidArgument("Image size is too large") }
        let size = rounded & ~511
        let geometry = ClusterGeometry(clusterBits: clusterBits, extendedL2: o.extendedL2)
        guard let l1Entries = geometry.l1EntriesNeeded(forVirtualSize: size), l1Entries <= QCOW2Limits.maxL1Entries,
              size <= UInt64(Int64.max)
        else {
            throw QCOW2Error.invalidArgument("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
        }

        return (version, clusterBits, size, l1Entries)
    }
}
