import QCOW2Format

/// The refcount structures of a writable image: the refcount table, its blocks (read on
/// demand, written through), and the cluster allocator (first fit, like QEMU's).
///
/// Ordering for crash consistency (format doc §14.5): a refcount increase is written before
/// the caller writes any reference to the cluster; new refcount blocks are written before
/// the table entry that points at them; a grown table is written and synced before the
/// header switches to it, and the old table is freed only afterwards.
final class RefcountManager {
    let file: FileHandle
    let clusterBits: UInt32
    let codec: RefcountBlockCodec
    private(set) var tableOffset: UInt64
    private(set) var tableClusters: UInt32
    private(set) var table: [UInt64]
    private var blocks: [UInt64: [UInt8]] = [:]
    /// Host offsets of every refcount block (for the overlap check).
    private(set) var blockOffsets: Set<UInt64> = []
    private let blockBudget: Int
    /// Lowest cluster index that may be free.
    private var freeHint: UInt64 = 1
    /// Writes the 12-byte (refcount_table_offset, refcount_table_clusters) header pair.
    private let switchTable: (UInt64, UInt32) throws -> Void

    var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    var entriesPerBlock: UInt64 { UInt64(codec.entries(clusterSize: Int(clusterSize))) }

    init(file: FileHandle, header: QCOW2Header, budget: Int = 4 << 20,
         switchTable: @escaping (UInt64, UInt32) throws -> Void) throws {
        self.file = file
        clusterBits = header.clusterBits
        codec = RefcountBlockCodec(order: header.refcountOrder)
        tableOffset = header.refcountTableOffset
        tableClusters = header.refcountTableClusters
        blockBudget = budget
        self.switchTable = switchTable
        guard tableClusters > 0, tableOffset != 0 else {
            throw QCOW2Error.format(path: file.path, .invalidField("refcount_table_clusters", value: UInt64(tableClusters), reason: "image does not contain a reference count table"))
        }
        let cs = UInt64(1) << UInt64(header.clusterBits)
        let offset = header.refcountTableOffset
        let bytes = UInt64(header.refcountTableClusters) * cs
        let fileSize = try file.size()
        guard offset < fileSize else {
            throw QCOW2Error.corrupt(path: file.path, "refcount table at 0x\(String(offset, radix: 16)) lies beyond the end of the file")
        }
        var t = [UInt64](repeating: 0, count: Int(bytes / 8))
        try t.withUnsafeMutableBytes { try file.read(into: $0, at: offset) }
        for i in t.indices {
            t[i] = UInt64(bigEndian: t[i])
            let e = RefcountTableEntry(rawValue: t[i])
            if e.hasReservedBits || (e.blockOffset & (cs - 1)) != 0 {
                throw QCOW2Error.corrupt(path: file.path, "refcount table entry \(i) is invalid (0x\(String(t[i], radix: 16)))")
            }
            t[i] = e.blockOffset
        }
        table = t
        blockOffsets = Set(t.filter { $0 != 0 })
    }

    // MARK: Reading and setting refcounts

    private func block(at offset: UInt64) throws -> [UInt8] {
        if let b = blocks[offset] { return b }
        if blocks.count * Int(clusterSize) >= blockBudget { blocks.removeAll(keepingCapacity: true) }
        let b = try file.read(count: Int(clusterSize), at: offset)
        blocks[offset] = b
        return b
    }

    func refcount(ofCluster c: UInt64) throws -> UInt64 {
        let r = c / entriesPerBlock
        guard r < UInt64(table.count), table[Int(r)] != 0 else { return 0 }
        let b = try block(at: table[Int(r)])
        return b.withUnsafeBytes { codec.get($0, Int(c % entriesPerBlock)) }
    }

    /// Stores a refcount, creating the refcount block (and growing the table) if needed.
    func setRefcount(ofCluster c: UInt64, to value: UInt64) throws {
        guard value <= codec.maxValue else {
            throw QCOW2Error.invalidArgument("refcount of cluster \(c) would exceed the maximum \(codec.maxValue) for \(codec.bits)-bit refcounts")
        }
        let blockOffset = try ensureBlock(forCluster: c)
        var b = try block(at: blockOffset)
        let index = Int(c % entriesPerBlock)
        b.withUnsafeMutableBytes { codec.set($0, index, value) }
        blocks[blockOffset] = b
        // Write through only the bytes that changed.
        let bitOffset = index * codec.bits
        let byteStart = bitOffset / 8
        let byteCount = max(1, codec.bits / 8)
        try b.withUnsafeBytes { raw in
            try file.write(UnsafeRawBufferPointer(rebasing: raw[byteStart..<(byteStart + byteCount)]), at: blockOffset + UInt64(byteStart))
        }
        if value == 0 && c < freeHint { freeHint = max(1, c) }
    }

    func increment(cluster c: UInt64, by delta: Int64) throws {
        let old = try refcount(ofCluster: c)
        let new: UInt64
        if delta >= 0 {
            let (s, o) = old.addingReportingOverflow(UInt64(delta))
            guard !o else { throw QCOW2Error.invalidArgument("refcount overflow for cluster \(c)") }
            new = s
        } else {
            guard old >= UInt64(-delta) else {
                throw QCOW2Error.corrupt(path: file.path, "refcount of cluster \(c) would drop below zero")
            }
            new = old - UInt64(-delta)
        }
        try setRefcount(ofCluster: c, to: new)
    }

    // MARK: Allocation

    /// Allocates `count` contiguous free clusters (first fit) with refcount 1 and returns
    /// the host offset of the first. The clusters' contents are not touched.
    func allocate(clusters count: UInt64) throws -> UInt64 {
        while true {
            let start = try findFree(count)
            // Create the refcount blocks first: a new block takes the first free cluster,
            // which may be inside the run just found. Then check the run is still free.
            var r = start / entriesPerBlock
            while r <= (start + count - 1) / entriesPerBlock {
                _ = try ensureBlock(forCluster: r * entriesPerBlock < start ? start : r * entriesPerBlock)
                r += 1
            }
            var stillFree = true
            for c in start..<(start + count) where try refcount(ofCluster: c) != 0 {
                stillFree = false
                break
            }
            guard stillFree else { continue }
            for c in start..<(start + count) { try setRefcount(ofCluster: c, to: 1) }
            return start << UInt64(clusterBits)
        }
    }

    /// Drops one reference to each cluster of `[offset, offset + length)`.
    func release(offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        let first = offset >> UInt64(clusterBits)
        let last = (offset + length - 1) >> UInt64(clusterBits)
        for c in first...last { try increment(cluster: c, by: -1) }
    }

    /// The highest cluster index below `limit` with a non-zero refcount.
    func lastUsedCluster(below limit: UInt64) throws -> UInt64 {
        var c = limit
        while c > 0 {
            c -= 1
            if try refcount(ofCluster: c) != 0 { return c }
        }
        return 0
    }

    /// The first free cluster (without taking it), like QEMU's `alloc_clusters_noref`.
    func nextFreeCluster() throws -> UInt64 { try findFree(1) }

    private func findFree(_ count: UInt64) throws -> UInt64 {
        var c = max(freeHint, 1)
        var runStart = c
        var firstFree: UInt64?
        while true {
            if try refcount(ofCluster: c) != 0 {
                c += 1
                runStart = c
            } else {
                if firstFree == nil { firstFree = c }
                c += 1
                if c - runStart == count { break }
            }
        }
        // Like QEMU's free_cluster_index: skip past the run when nothing free precedes it,
        // so refcount blocks created for the run land after it.
        freeHint = firstFree == runStart ? runStart + count : (firstFree ?? runStart)
        return runStart
    }

    /// The host offset of the refcount block covering cluster `c`, creating it if needed.
    private func ensureBlock(forCluster c: UInt64) throws -> UInt64 {
        let r = c / entriesPerBlock
        if r >= UInt64(table.count) { try growTable(toCover: r, including: c) }
        if table[Int(r)] != 0 { return table[Int(r)] }
        // A new block: take the first free cluster. If it falls inside the range the block
        // describes, the block counts itself.
        let candidate = try findFree(1)
        let newOffset = candidate << UInt64(clusterBits)
        var b = [UInt8](repeating: 0, count: Int(clusterSize))
        if candidate / entriesPerBlock == r {
            b.withUnsafeMutableBytes { codec.set($0, Int(candidate % entriesPerBlock), 1) }
            try file.write(b, at: newOffset)
        } else {
            try file.write(b, at: newOffset)
            try setRefcount(ofCluster: candidate, to: 1)
            if table[Int(r)] != 0 { return table[Int(r)] }  // created meanwhile by recursion
        }
        blocks[newOffset] = b
        blockOffsets.insert(newOffset)
        table[Int(r)] = newOffset
        var be = newOffset.bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: tableOffset + r * 8) }
        return newOffset
    }

    /// Builds a larger refcount table (and the refcount blocks that describe it) in fresh
    /// clusters at the end of the image, switches the header to it, then frees the old one.
    private func growTable(toCover r: UInt64, including c: UInt64) throws {
        let n = entriesPerBlock
        let cs = clusterSize
        let entriesPerCluster = cs / 8
        let fileClusters = (try file.size() + cs - 1) / cs
        // The new area starts after everything that exists or is being addressed.
        let areaStart = max(fileClusters, c + 1, UInt64(table.count) * n)
        var newEntries = max(UInt64(table.count) * 3 / 2, r + 1)
        var newBlocks: [UInt64] = []  // range indices needing a block inside the area
        var tableClustersNeeded: UInt64 = 0
        // Iterate to a fixed point: the area must hold the table and blocks for its own ranges.
        for _ in 0..<16 {
            tableClustersNeeded = (newEntries + entriesPerCluster - 1) / entriesPerCluster
            let areaEnd = areaStart + tableClustersNeeded + UInt64(newBlocks.count)
            newEntries = max(newEntries, (areaEnd + n - 1) / n + 1)
            tableClustersNeeded = (newEntries + entriesPerCluster - 1) / entriesPerCluster
            let end = areaStart + tableClustersNeeded + UInt64(newBlocks.count)
            var needed: [UInt64] = []
            for range in (areaStart / n)...((end - 1) / n) where range >= UInt64(table.count) || table[Int(range)] == 0 {
                needed.append(range)
            }
            if needed.count == newBlocks.count { break }
            newBlocks = needed
        }
        guard tableClustersNeeded * cs <= QCOW2Limits.maxRefcountTableBytes else {
            throw QCOW2Error.invalidArgument("image too large: the refcount table would exceed 8 MiB")
        }
        let tableStart = areaStart
        let blocksStart = areaStart + tableClustersNeeded
        var newTable = table
        newTable.append(contentsOf: [UInt64](repeating: 0, count: Int(tableClustersNeeded * entriesPerCluster) - table.count))
        var blockContents: [UInt64: [UInt8]] = [:]
        for (i, range) in newBlocks.enumerated() {
            newTable[Int(range)] = (blocksStart + UInt64(i)) << UInt64(clusterBits)
            blockContents[range] = [UInt8](repeating: 0, count: Int(cs))
        }
        // Refcounts of the area's own clusters: in new blocks directly, else through old ones.
        let areaEnd = blocksStart + UInt64(newBlocks.count)
        var viaOld: [UInt64] = []
        for cl in tableStart..<areaEnd {
            let range = cl / n
            if blockContents[range] != nil {
                blockContents[range]!.withUnsafeMutableBytes { codec.set($0, Int(cl % n), 1) }
            } else {
                viaOld.append(cl)
            }
        }
        for (range, bytes) in blockContents { try file.write(bytes, at: newTable[Int(range)]) }
        for cl in viaOld { try setRefcount(ofCluster: cl, to: 1) }
        var tableBytes = [UInt8](); tableBytes.reserveCapacity(newTable.count * 8)
        for e in newTable { tableBytes.appendBE(e) }
        try file.write(tableBytes, at: tableStart << UInt64(clusterBits))
        try file.sync()
        let oldOffset = tableOffset, oldClusters = tableClusters
        try switchTable(tableStart << UInt64(clusterBits), UInt32(tableClustersNeeded))
        try file.sync()
        for (range, bytes) in blockContents {
            blocks[newTable[Int(range)]] = bytes
            blockOffsets.insert(newTable[Int(range)])
        }
        table = newTable
        tableOffset = tableStart << UInt64(clusterBits)
        tableClusters = UInt32(tableClustersNeeded)
        try release(offset: oldOffset, length: UInt64(oldClusters) << UInt64(clusterBits))
    }
}
