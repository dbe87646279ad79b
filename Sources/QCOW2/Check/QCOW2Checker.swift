import QCOW2Format

/// One pass of `qemu-img check` over a qcow2 file: QEMU's `qcow2_co_check_locked` with its
/// helpers from block/qcow2-refcount.c and block/qcow2-snapshot.c, reimplemented.
///
/// The pass rebuilds the expected refcount of every host cluster from the metadata (format
/// doc §7.5) into a `ReferenceTable`, validating every entry on the way, compares it with the
/// refcounts on disk, checks the copied flags of the active tree, and repairs what `repair`
/// allows. Findings are reported line by line through `log`, worded as QEMU words them.
///
/// Memory is bounded by the file: the reference table has one counter per cluster of the
/// file (plus the clusters a rebuild appends), tables are read only as far as they lie inside
/// the file (past the end they read as zeros), and references past the end are reported
/// rather than counted.
final class QCOW2Checker {
    let file: FileHandle
    let path: String
    let repair: CheckRepair
    let writable: Bool
    let log: (String) -> Void

    var image: ImageHeader
    var header: QCOW2Header { image.header }
    let clusterBits: UInt64
    let clusterSize: UInt64
    let extendedL2: Bool
    /// Entries per L2 table.
    let l2Entries: Int
    /// Bytes per L2 entry (8, or 16 with extended L2).
    let l2EntrySize: Int
    let codec: RefcountBlockCodec
    /// Refcounts per refcount block.
    let entriesPerBlock: UInt64
    let hasDataFile: Bool

    /// The refcount table as on disk (raw entries; entries past the end of the file are 0).
    var reftable: [UInt64]
    var reftableOffset: UInt64
    /// Entries of the table as the header declares it (`refcount_table_clusters` × cs / 8).
    var reftableSize: UInt64
    /// The active L1 table (entries inside the file; the rest are 0 and are not stored).
    var l1: [UInt64]
    /// `l1_size` from the header.
    let l1Size: UInt32

    /// The snapshot table as the check read it.
    var snapshots: [CheckSnapshot] = []
    var snapshotsOffset: UInt64 = 0
    var snapshotsSize: UInt64 = 0

    /// The current length of the file (updated by the writes of a repair).
    var fileSize: UInt64
    /// QEMU's `signaled_corruption`.
    var signaledCorruption = false
    /// Errors reading on-disk refcounts (an unaligned refcount block); a successful rebuild
    /// makes them moot.
    var refcountReadErrors = 0
    /// The most recently read refcount block.
    private var cachedBlock: (offset: UInt64, bytes: [UInt8])?

    // Masks (format doc §4).
    static let l1OffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let l1ReservedMask: UInt64 = 0x7F00_0000_0000_01FF
    static let l2OffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let l2ReservedMask: UInt64 = 0x3F00_0000_0000_01FE
    static let reftableOffsetMask: UInt64 = 0xFFFF_FFFF_FFFF_FE00
    static let reftableReservedMask: UInt64 = 0x1FF
    static let copied: UInt64 = 1 << 63
    static let compressed: UInt64 = 1 << 62
    static let zero: UInt64 = 1
    static let allAllocBits: UInt64 = 0xFFFF_FFFF
    static let allZeroBits: UInt64 = 0xFFFF_FFFF_0000_0000

    init(file: FileHandle, path: String, repair: CheckRepair, writable: Bool, log: @escaping (String) -> Void) throws {
        self.file = file
        self.path = path
        self.repair = repair
        self.writable = writable
        self.log = log
        fileSize = try file.size()
        image = try Self.readImageHeader(file: file, path: path, fileSize: fileSize)
        let h = image.header
        clusterBits = UInt64(h.clusterBits)
        clusterSize = 1 << clusterBits
        extendedL2 = h.hasExtendedL2
        l2EntrySize = extendedL2 ? 16 : 8
        l2Entries = Int(clusterSize) / l2EntrySize
        codec = RefcountBlockCodec(order: h.refcountOrder)
        entriesPerBlock = UInt64(codec.entries(clusterSize: Int(clusterSize)))
        hasDataFile = h.hasExternalDataFile
        reftableOffset = h.refcountTableOffset
        reftableSize = UInt64(h.refcountTableClusters) * clusterSize / 8
        l1Size = h.l1Size
        reftable = []
        l1 = []
        reftable = try readTable(offset: reftableOffset, entries: reftableSize)
        l1 = try readTable(offset: h.l1TableOffset, entries: UInt64(h.l1Size))
    }

    /// Reads and validates cluster 0 like QEMU's open in check mode: every structural check
    /// except those of the snapshot table pointer, which the check itself examines.
    static func readImageHeader(file: FileHandle, path: String, fileSize: UInt64) throws -> ImageHeader {
        func parse(_ raw: [UInt8]) throws -> ImageHeader {
            var bytes = raw
            if bytes.count < 72 { bytes.append(contentsOf: repeatElement(0, count: 72 - bytes.count)) }
            // The snapshot table pointer is examined by the check itself; the L1 table
            // offset only as QEMU does (aligned, and the table below 2^63: a table past the
            // 2^56 host offset limit is a reference beyond the end of the file).
            let pointer = Array(bytes[60..<72])
            let l1Pointer = Array(bytes[40..<48])
            for i in 60..<72 { bytes[i] = 0 }
            for i in 40..<48 { bytes[i] = 0 }
            var image: ImageHeader
            do { image = try ImageHeader.parse(bytes) } catch { throw QCOW2Error.format(path: path, error) }
            let r = ByteReader(pointer, structure: "header")
            image.header.nbSnapshots = (try? r.u32(0)) ?? 0
            image.header.snapshotsOffset = (try? r.u64(4)) ?? 0
            let l1Offset = (try? ByteReader(l1Pointer, structure: "header").u64(0)) ?? 0
            let l1Bytes = UInt64(image.header.l1Size) * 8
            guard l1Offset % UInt64(image.header.clusterSize) == 0, l1Offset <= UInt64(Int64.max) - l1Bytes else {
                throw QCOW2Error.format(path: path, .invalidField("l1_table_offset", value: l1Offset, reason: "Active L1 table offset invalid"))
            }
            image.header.l1TableOffset = l1Offset
            return image
        }
        var bytes = try file.read(count: Int(min(65536, max(fileSize, 104))), at: 0)
        do {
            return try parse(bytes)
        } catch let QCOW2Error.format(_, error) {
            guard case .truncated = error else { throw QCOW2Error.format(path: path, error) }
            // The extensions or the backing file name lie past the prefix: read cluster 0.
            let clusterBits = bytes.count >= 24 ? Int(UInt32(bytes[20]) << 24 | UInt32(bytes[21]) << 16 | UInt32(bytes[22]) << 8 | UInt32(bytes[23])) : 16
            let size = 1 << min(max(clusterBits, 9), 21)
            guard size > bytes.count else { throw QCOW2Error.format(path: path, error) }
            bytes = try file.read(count: size, at: 0)
            return try parse(bytes)
        }
    }

    /// The big-endian 64-bit table at `offset` with `entries` entries, as far as it lies
    /// inside the file (the entries past the end of the file are 0 and are left out).
    func readTable(offset: UInt64, entries: UInt64) throws -> [UInt64] {
        guard entries > 0, offset < fileSize else { return [] }
        let inFile = min(entries, (fileSize - offset + 7) / 8)
        var table = [UInt64](repeating: 0, count: Int(inFile))
        try table.withUnsafeMutableBytes { try file.read(into: $0, at: offset) }
        for i in table.indices { table[i] = UInt64(bigEndian: table[i]) }
        return table
    }

    // MARK: Small helpers

    func offsetInCluster(_ v: UInt64) -> UInt64 { v & (clusterSize - 1) }

    static func hex(_ v: UInt64) -> String { String(v, radix: 16) }
    /// C's `%#x`: "0" for zero, else "0x…".
    static func altHex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }

    var fixWord: String { repair.contains(.errors) ? "Repairing" : "ERROR" }

    /// QEMU's `qcow2_signal_corruption`.
    func signalCorruption(fatal: Bool, _ message: String) {
        let fatal = fatal && writable
        if signaledCorruption && (!fatal || header.incompatibleFeatures.contains(.corrupt)) { return }
        if fatal {
            log("qcow2: Marking image as corrupt: \(message); further corruption events will be suppressed")
            try? setIncompatibleBits(adding: .corrupt)
        } else {
            log("qcow2: Image is corrupt: \(message); further non-fatal corruption events will be suppressed")
        }
        signaledCorruption = true
    }

    /// Rewrites the incompatible feature field (v3 only; v2 has none).
    func setIncompatibleBits(adding: IncompatibleFeatures = [], removing: IncompatibleFeatures = []) throws {
        guard header.version >= 3 else { return }
        var bits = header.incompatibleFeatures
        bits.formUnion(adding)
        bits.subtract(removing)
        guard bits != header.incompatibleFeatures else { return }
        try file.sync()
        var be = bits.rawValue.bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: 72) }
        try file.sync()
        image.header.incompatibleFeatures = bits
    }

    // MARK: On-disk refcounts

    /// QEMU's `qcow2_get_refcount`: 0 past the table or for an empty entry; an unaligned
    /// refcount block is an I/O error (and a corruption event).
    func onDiskRefcount(_ cluster: UInt64) throws(CheckStop) -> UInt64 {
        let index = cluster / entriesPerBlock
        guard index < UInt64(reftable.count) else { return 0 }
        let blockOffset = reftable[Int(index)] & Self.reftableOffsetMask
        guard blockOffset != 0 else { return 0 }
        guard offsetInCluster(blockOffset) == 0 else {
            signalCorruption(fatal: true, "Refblock offset \(Self.altHex(blockOffset)) unaligned (reftable index: \(Self.altHex(index)))")
            throw .io
        }
        let block = try refcountBlock(at: blockOffset)
        return block.withUnsafeBytes { codec.get($0, Int(cluster % entriesPerBlock)) }
    }

    private func refcountBlock(at offset: UInt64) throws(CheckStop) -> [UInt8] {
        if let c = cachedBlock, c.offset == offset { return c.bytes }
        let bytes: [UInt8]
        do { bytes = try file.read(count: Int(clusterSize), at: offset) } catch { throw CheckStop.io }
        cachedBlock = (offset, bytes)
        return bytes
    }

    /// Sets one on-disk refcount (the block exists and is aligned: the caller read a
    /// non-zero refcount from it). A refcount that drops to 0 frees the cluster, which QEMU
    /// discards (`QCOW2_DISCARD_ALWAYS`): the file gets a hole there.
    func setOnDiskRefcount(_ cluster: UInt64, _ value: UInt64) throws {
        let index = cluster / entriesPerBlock
        let blockOffset = reftable[Int(index)] & Self.reftableOffsetMask
        var block = try refcountBlock(at: blockOffset)
        let i = Int(cluster % entriesPerBlock)
        block.withUnsafeMutableBytes { codec.set($0, i, value) }
        cachedBlock = (blockOffset, block)
        let start = i * codec.bits / 8
        let count = max(1, codec.bits / 8)
        try file.write(Array(block[start..<(start + count)]), at: blockOffset + UInt64(start))
        if value == 0, cluster * clusterSize < fileSize {
            file.punchHole(at: cluster * clusterSize, length: min(clusterSize, fileSize - cluster * clusterSize))
        }
    }

    func dropRefcountCache() { cachedBlock = nil }
}

/// A snapshot table entry as the check reads it: nothing validated, nothing dropped except
/// what QEMU drops (extra data beyond 1024 bytes under `-r all`).
struct CheckSnapshot {
    var l1TableOffset: UInt64
    var l1Size: UInt32
    var id: [UInt8]
    var name: [UInt8]
    var dateSeconds: UInt32
    var dateNanoseconds: UInt32
    var vmClock: UInt64
    var vmStateSize: UInt64
    /// As stored (after truncation to 1024 by a repair).
    var extraDataSize: UInt32
    var diskSize: UInt64
    var icount: UInt64
    /// Extra data past the 24 known bytes.
    var unknownExtra: [UInt8]

    var idString: String { String(decoding: id, as: UTF8.self) }
    var nameString: String { String(decoding: name, as: UTF8.self) }
}
