import QCOW2Format

/// Counts, for every host cluster of an image file, how many metadata paths reference it:
/// the refcounts the image should have (format doc §7.5). This is what `qemu-img check`
/// computes, and what a refcount rebuild writes.
///
/// Memory is bounded by the real file size (one counter per cluster of the file), never by
/// an offset found inside the file: a reference past the end is an error.
struct ReferenceCounter {
    let file: FileHandle
    let image: ImageHeader
    let clusterSize: UInt64
    let geometry: ClusterGeometry
    private(set) var counts: [UInt64]

    var header: QCOW2Header { image.header }

    init(file: FileHandle, image: ImageHeader) throws {
        self.file = file
        self.image = image
        geometry = ClusterGeometry(clusterBits: image.header.clusterBits, extendedL2: image.header.hasExtendedL2)
        clusterSize = geometry.clusterSize
        let size = try file.size()
        counts = [UInt64](repeating: 0, count: Int((size + clusterSize - 1) / clusterSize))
    }

    private mutating func add(_ offset: UInt64, _ length: UInt64, _ what: String) throws {
        guard length > 0 else { return }
        let first = offset / clusterSize
        let (end, overflow) = offset.addingReportingOverflow(length - 1)
        guard !overflow else { throw QCOW2Error.corrupt(path: file.path, "\(what) at 0x\(String(offset, radix: 16)) overflows") }
        let last = end / clusterSize
        guard last < UInt64(counts.count) else {
            throw QCOW2Error.corrupt(path: file.path, "\(what) at 0x\(String(offset, radix: 16)) (\(length) bytes) lies beyond the end of the file")
        }
        for c in first...last { counts[Int(c)] += 1 }
    }

    /// Walks every structure reachable from the header and counts its clusters. The current
    /// refcount table and blocks are counted only when `includeRefcountStructures` is set.
    mutating func countAll(includeRefcountStructures: Bool) throws {
        let h = header
        try add(0, clusterSize, "header")
        try walkL1(offset: h.l1TableOffset, size: h.l1Size, what: "active L1 table")
        if includeRefcountStructures {
            try add(h.refcountTableOffset, UInt64(h.refcountTableClusters) * clusterSize, "refcount table")
            let table = try file.read(count: Int(UInt64(h.refcountTableClusters) * clusterSize), at: h.refcountTableOffset)
            try table.withUnsafeBytes { raw in
                for i in 0..<(raw.count / 8) {
                    let e = RefcountTableEntry(rawValue: loadBE64(raw, i * 8))
                    if e.blockOffset != 0 { try add(e.blockOffset, clusterSize, "refcount block") }
                }
            }
        }
        if h.nbSnapshots > 0 {
            let size = try file.size()
            guard h.snapshotsOffset < size else { throw QCOW2Error.corrupt(path: file.path, "snapshot table lies beyond the end of the file") }
            let bytes = try file.read(count: Int(min(size - h.snapshotsOffset, QCOW2Limits.maxSnapshotTableBytes)), at: h.snapshotsOffset)
            let snapshots: [SnapshotTableEntry]
            do {
                snapshots = try SnapshotTableEntry.parseTable(bytes, count: Int(h.nbSnapshots), clusterSize: clusterSize)
            } catch { throw QCOW2Error.format(path: file.path, error) }
            try add(h.snapshotsOffset, UInt64(SnapshotTableEntry.tableSize(snapshots)), "snapshot table")
            for s in snapshots { try walkL1(offset: s.l1TableOffset, size: s.l1Size, what: "snapshot \(s.id) L1 table") }
        }
        if let fde = image.fullDiskEncryption { try add(fde.offset, fde.length, "encryption header") }
        if let b = image.bitmaps { try countBitmaps(b) }
    }

    private mutating func walkL1(offset: UInt64, size: UInt32, what: String) throws {
        guard size > 0 else { return }
        try add(offset, UInt64(size) * 8, what)
        var l1 = [UInt64](repeating: 0, count: Int(size))
        try l1.withUnsafeMutableBytes { try file.read(into: $0, at: offset) }
        for raw in l1 {
            let e = L1Entry(rawValue: UInt64(bigEndian: raw))
            let l2 = e.l2Offset
            guard l2 != 0 else { continue }
            guard l2 % clusterSize == 0 else { throw QCOW2Error.corrupt(path: file.path, "L2 table offset 0x\(String(l2, radix: 16)) is not cluster aligned") }
            try add(l2, clusterSize, "L2 table")
            let table = try file.read(count: Int(clusterSize), at: l2)
            try table.withUnsafeBytes { raw in
                let entrySize = Int(geometry.l2EntrySize)
                for i in 0..<Int(geometry.l2Entries) {
                    let entry = L2Entry(rawValue: loadBE64(raw, i * entrySize), bitmap: geometry.extendedL2 ? loadBE64(raw, i * entrySize + 8) : 0)
                    let kind: ClusterKind
                    do throws(FormatError) {
                        kind = try entry.clusterKind(geometry: geometry, version: header.version, externalData: header.hasExternalDataFile)
                    } catch { throw QCOW2Error.format(path: file.path, error) }
                    switch kind {
                    case let .normal(h), let .zeroAllocated(h):
                        if !header.hasExternalDataFile { try add(h, clusterSize, "data cluster") }
                    case let .compressed(d):
                        try add(d.hostOffset & ~511, d.compressedSize + (d.hostOffset & 511), "compressed cluster")
                    case .unallocated, .zeroPlain:
                        break
                    }
                }
            }
        }
    }

    private mutating func countBitmaps(_ b: BitmapsExtension) throws {
        guard b.directorySize > 0, b.directorySize <= 1024 * 65535 else { return }
        try add(b.directoryOffset, b.directorySize, "bitmap directory")
        let dir = try file.read(count: Int(b.directorySize), at: b.directoryOffset)
        let r = ByteReader(dir, structure: "bitmap directory")
        var pos = 0
        for _ in 0..<Int(b.count) {
            guard pos + 24 <= dir.count else { break }
            do {
                let tableOffset = try r.u64(pos)
                let tableSize = try r.u32(pos + 8)
                let nameSize = Int(try r.u16(pos + 18))
                let extra = Int(try r.u32(pos + 20))
                if tableSize > 0 && tableOffset != 0 {
                    try add(tableOffset, UInt64(tableSize) * 8, "bitmap table")
                    let table = try file.read(count: Int(tableSize) * 8, at: tableOffset)
                    try table.withUnsafeBytes { raw in
                        for i in 0..<Int(tableSize) {
                            let data = loadBE64(raw, i * 8) & L2Entry.offsetMask
                            if data != 0 { try add(data, clusterSize, "bitmap data") }
                        }
                    }
                }
                pos = (pos + 24 + extra + nameSize + 7) & ~7
            } catch let e as FormatError {
                throw QCOW2Error.format(path: file.path, e)
            }
        }
    }
}

/// Writes a fresh refcount table and refcount blocks computed from the metadata (QEMU's
/// "Rebuilding refcount structure"), optionally with a new refcount width.
///
/// The new structures go after the end of the file; once written and synced, one header
/// write switches to them (and to the new `refcount_order`). The old table and blocks are
/// then simply unreferenced free space.
enum RefcountRebuild {
    static func rebuild(file: FileHandle, image: inout ImageHeader, newOrder: UInt32? = nil) throws {
        var counter = try ReferenceCounter(file: file, image: image)
        try counter.countAll(includeRefcountStructures: false)
        let order = newOrder ?? image.header.refcountOrder
        let codec = RefcountBlockCodec(order: order)
        let cs = counter.clusterSize
        let counts = counter.counts
        if let worst = counts.max(), worst > codec.maxValue {
            throw QCOW2Error.invalidArgument("a cluster has \(worst) references, more than \(codec.bits)-bit refcounts can hold")
        }
        let perBlock = UInt64(codec.entries(clusterSize: Int(cs)))
        let perTableCluster = cs / 8
        let start = UInt64(counts.count)  // new structures start after the end of the file
        var blocks: UInt64 = 0, tableClusters: UInt64 = 0
        while true {
            let total = start + tableClusters + blocks
            let needBlocks = (total + perBlock - 1) / perBlock
            let needTable = (needBlocks + perTableCluster - 1) / perTableCluster
            if needBlocks == blocks && needTable == tableClusters { break }
            blocks = needBlocks
            tableClusters = needTable
        }
        guard tableClusters * cs <= QCOW2Limits.maxRefcountTableBytes else {
            throw QCOW2Error.invalidArgument("image too large for a refcount table of at most 8 MiB")
        }
        let tableStart = start
        let blocksStart = start + tableClusters
        let end = blocksStart + blocks
        var table = [UInt8](repeating: 0, count: Int(tableClusters * cs))
        var block = [UInt8](repeating: 0, count: Int(cs))
        for b in 0..<blocks {
            block.withUnsafeMutableBytes { raw in
                raw.initializeMemory(as: UInt8.self, repeating: 0)
                for i in 0..<perBlock {
                    let c = b * perBlock + i
                    let v: UInt64 = c < start ? counts[Int(c)] : (c < end ? 1 : 0)
                    if v != 0 { codec.set(raw, Int(i), v) }
                }
            }
            let offset = (blocksStart + b) * cs
            try file.write(block, at: offset)
            table.putBE(offset, at: Int(b) * 8)
        }
        try file.write(table, at: tableStart * cs)
        try file.sync()
        image.header.refcountTableOffset = tableStart * cs
        image.header.refcountTableClusters = UInt32(tableClusters)
        image.header.refcountOrder = order
        // One write covers the table pointer (48..59) and, for v3, refcount_order (96..99).
        let fixed = image.header.serialize()
        let upTo = image.header.version >= 3 ? 100 : 60
        try file.write(Array(fixed[48..<upTo]), at: 48)
        try file.sync()
    }
}
