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

    // MARK: Reading refcounts

    private func block(at offset: UInt64) throws -> [UInt8] {
        try loadBlock(offset)
        return blocks[offset] ?? []
    }

    /// Makes sure a block is in the cache (writing dirty blocks out before evicting).
    private func loadBlock(_ offset: UInt64) throws {
        if blocks[offset] != nil { return }
        if blocks.count * Int(clusterSize) >= blockBudget {
            try writeDirtyBlocks()
            blocks.removeAll(keepingCapacity: true)
        }
        blocks[offset] = try file.read(count: Int(clusterSize), at: offset)
    }

    func refcount(ofCluster c: UInt64) throws -> UInt64 {
        let r = c / entriesPerBlock
        guard r < UInt64(table.count), table[Int(r)] != 0 else { return 0 }
        let offset = table[Int(r)]
        try loadBlock(offset)
        return blocks[offset]?.withUnsafeBytes { codec.get($0, Int(c % entriesPerBlock)) } ?? 0
    }

    /// Changes one refcount entry in the cached block (write-back: `writeDirtyBlocks`
    /// puts it on disk; callers do so before anything that depends on it is written).
    private func store(_ value: UInt64, cluster c: UInt64, blockOffset: UInt64) throws {
        try loadBlock(blockOffset)
        let index = Int(c % entriesPerBlock)
        blocks[blockOffset]?.withUnsafeMutableBytes { codec.set($0, index, value) }
        dirtyBlocks.insert(blockOffset)
    }

    /// Blocks changed in memory and not yet written.
    private var dirtyBlocks: Set<UInt64> = []
    var hasDirtyBlocks: Bool { !dirtyBlocks.isEmpty }

    /// Writes every changed refcount block (not synced: the caller syncs).
    func writeDirtyBlocks() throws {
        for offset in dirtyBlocks.sorted() {
            if let b = blocks[offset] { try file.write(b, at: offset) }
        }
        dirtyBlocks.removeAll()
    }

    // MARK: QEMU's allocation algorithm
    //
    // The structure follows block/qcow2-refcount.c so that images come out laid out as
    // QEMU lays them out: `allocNoref` scans from `freeClusterIndex`, `update` changes
    // refcounts and creates refcount blocks on the way (restarting the caller's search,
    // QEMU's -EAGAIN, when it had to take clusters), and `refcountArea` builds a grown,
    // self-describing refcount table.

    /// Thrown when metadata was allocated while updating refcounts: the caller searches again.
    private struct Again: Error {}

    /// A refcount change the metadata asks for that no consistent image can ask for: a
    /// cluster in use beyond the end of the file, or a decrement where no refcount block
    /// exists. Never answered by allocating (an L2 entry pointing at 256 GiB would
    /// otherwise grow the refcount structures, and the file, to 256 GiB); the writer
    /// marks the image corrupt (QEMU's `qcow2_signal_corruption`).
    struct Corruption: Error, CustomStringConvertible {
        let description: String
    }

    /// The file size last seen (refreshed only when a cluster in use lies beyond it).
    private var knownFileEnd: UInt64 = 0
    /// End of the clusters allocated by this manager, whose contents may not be written
    /// yet (a cluster below it is inside the image even when the file is still shorter).
    private var allocatedEnd: UInt64 = 0

    private func noteAllocated(_ end: UInt64) { allocatedEnd = max(allocatedEnd, end) }

    /// A cluster referenced by metadata must lie inside the image.
    private func checkInsideFile(_ c: UInt64) throws {
        let offset = c << UInt64(clusterBits)  // c = some offset / clusterSize: no overflow
        if offset < knownFileEnd || offset < allocatedEnd { return }
        knownFileEnd = try file.size()
        guard offset < knownFileEnd else {
            throw Corruption(description: "Cannot update refcount of cluster at offset 0x\(String(offset, radix: 16)): beyond the end of the image file (0x\(String(knownFileEnd, radix: 16)) bytes)")
        }
    }

    /// The existing refcount block for cluster `c`, or nil.
    private func existingBlock(forCluster c: UInt64) -> UInt64? {
        let r = c / entriesPerBlock
        guard r < UInt64(table.count), table[Int(r)] != 0 else { return nil }
        return table[Int(r)]
    }

    /// QEMU's `free_cluster_index`: no free cluster lies below it.
    private var freeClusterIndex: UInt64 = 0

    /// Finds `count` free clusters from `freeClusterIndex` on, without taking them.
    private func allocNoref(_ count: UInt64) throws -> UInt64 {
        var i: UInt64 = 0
        while i < count {
            let c = freeClusterIndex
            freeClusterIndex += 1
            if try refcount(ofCluster: c) != 0 {
                i = 0
            } else {
                i += 1
            }
        }
        guard freeClusterIndex <= UInt64(Int64.max) >> UInt64(clusterBits) else {
            throw QCOW2Error.invalidArgument("image file would exceed the largest file offset")
        }
        return freeClusterIndex - count
    }

    /// Adds `addend` to (or subtracts it from) the refcount of every cluster touched by
    /// `[offset, offset+length)`. On `Again` the changes made so far are undone.
    /// `inUse`: the clusters are referenced by (possibly hostile) metadata rather than
    /// being allocated now, so they must lie inside the file. A decrease never creates a
    /// refcount block: a cluster without one has refcount 0 and cannot be freed.
    private func update(_ offset: UInt64, _ length: UInt64, addend: UInt64, decrease: Bool, inUse: Bool = false) throws {
        guard length > 0 else { return }
        let (lastByte, overflow) = offset.addingReportingOverflow(length - 1)
        guard !overflow else {
            throw Corruption(description: "Cannot update refcounts of 0x\(String(length, radix: 16)) bytes at offset 0x\(String(offset, radix: 16)): the range overflows")
        }
        let first = offset / clusterSize, last = lastByte / clusterSize
        var c = first
        do {
            while c <= last {
                if inUse { try checkInsideFile(c) }
                let blockOffset: UInt64
                if decrease {
                    guard let existing = existingBlock(forCluster: c) else {
                        throw Corruption(description: "Cannot free cluster at offset 0x\(String(c << UInt64(clusterBits), radix: 16)): it has no refcount block (refcount 0)")
                    }
                    blockOffset = existing
                } else {
                    do {
                        blockOffset = try allocRefcountBlock(forCluster: c)
                    } catch let again as Again {
                        // As QEMU: the caller's search restarts at the clusters it had
                        // found, which are usually still free (the new block went after them).
                        if freeClusterIndex > first { freeClusterIndex = first }
                        throw again
                    }
                }
                let old = try refcount(ofCluster: c)
                let new: UInt64
                if decrease {
                    guard old >= addend else {
                        throw QCOW2Error.corrupt(path: file.path, "refcount of cluster \(c) would drop below zero")
                    }
                    new = old - addend
                } else {
                    let (sum, overflow) = old.addingReportingOverflow(addend)
                    guard !overflow, sum <= codec.maxValue else {
                        throw QCOW2Error.invalidArgument("refcount of cluster \(c) would exceed the maximum \(codec.maxValue) for \(codec.bits)-bit refcounts")
                    }
                    new = sum
                }
                if new == 0 && c < freeClusterIndex { freeClusterIndex = c }
                // A freed cluster must not keep receiving compressed streams.
                if new == 0 && freeByteOffset != 0 && freeByteOffset / clusterSize == c { freeByteOffset = 0 }
                try store(new, cluster: c, blockOffset: blockOffset)
                c += 1
            }
        } catch {
            if c > first { try? update(offset, (c - first) * clusterSize - (offset % clusterSize), addend: addend, decrease: !decrease, inUse: inUse) }
            throw error
        }
    }

    /// The refcount block for cluster `c`, creating it (and growing the table) if needed.
    private func allocRefcountBlock(forCluster c: UInt64) throws -> UInt64 {
        let r = c / entriesPerBlock
        if r < UInt64(table.count), table[Int(r)] != 0 { return table[Int(r)] }
        let newBlock = try allocNoref(1)
        let newOffset = newBlock * clusterSize
        var b = [UInt8](repeating: 0, count: Int(clusterSize))
        if newBlock / entriesPerBlock == r {
            // The block describes itself.
            b.withUnsafeMutableBytes { codec.set($0, Int(newBlock % entriesPerBlock), 1) }
        } else {
            try update(newOffset, clusterSize, addend: 1, decrease: false)
        }
        try file.write(b, at: newOffset)
        noteAllocated(newOffset + clusterSize)
        blocks[newOffset] = b
        blockOffsets.insert(newOffset)
        if r < UInt64(table.count) {
            // The new block's own refcount (possibly in another block) must be on disk
            // before the table points at it.
            try writeDirtyBlocks()
            try file.sync()
            var be = newOffset.bigEndian
            try withUnsafeBytes(of: &be) { try file.write($0, at: tableOffset + r * 8) }
            try file.sync()
            table[Int(r)] = newOffset
            throw Again()
        }
        // The table is full: build a bigger one after the last block in use.
        let blocksUsed = (max(c + 1, newBlock + 1) + entriesPerBlock - 1) / entriesPerBlock
        _ = try refcountArea(startCluster: blocksUsed * entriesPerBlock, additionalClusters: 0, exactSize: false,
                             newRefblockIndex: Int(r), newRefblockOffset: newOffset)
        throw Again()
    }

    /// QEMU's `qcow2_refcount_metadata_size`: refcount blocks needed to count `clusters`
    /// clusters plus the refcount structures themselves.
    private func refblockCount(clusters: UInt64, generous: Bool) -> UInt64 {
        let perTableCluster = clusterSize / 8
        var clusters = clusters, generous = generous
        var table: UInt64 = 0, blocks: UInt64 = 0, n: UInt64 = 0, last: UInt64
        repeat {
            last = n
            blocks = (clusters + table + blocks + entriesPerBlock - 1) / entriesPerBlock
            table = (blocks + perTableCluster - 1) / perTableCluster
            n = clusters + blocks + table
            if n == last && generous {
                clusters += (table + 1) / 2
                n = 0
                generous = false
            }
        } while n != last
        return blocks
    }

    /// QEMU's `qcow2_refcount_area`: at `startCluster` (end of the image), new refcount
    /// blocks and a new, larger table that cover themselves; then the header switch and the
    /// release of the old table. Returns the cluster after the new structures.
    func refcountArea(startCluster: UInt64, additionalClusters: UInt64, exactSize: Bool,
                              newRefblockIndex: Int, newRefblockOffset: UInt64) throws -> UInt64 {
        let total = refblockCount(clusters: startCluster + additionalClusters, generous: !exactSize)
        let perTableCluster = clusterSize / 8
        var tableSize = exactSize ? total : total + (total + 1) / 2
        tableSize = (tableSize + perTableCluster - 1) / perTableCluster * perTableCluster
        let tableClusters = tableSize / perTableCluster
        guard tableSize * 8 <= QCOW2Limits.maxRefcountTableBytes else {
            throw QCOW2Error.invalidArgument("image too large: the refcount table would exceed 8 MiB")
        }
        var newTable = [UInt64](repeating: 0, count: Int(tableSize))
        for i in 0..<min(table.count, Int(tableSize)) { newTable[i] = table[i] }
        if newRefblockOffset != 0 { newTable[newRefblockIndex] = newRefblockOffset }
        let areaIndex = Int(startCluster / entriesPerBlock)
        var additional: UInt64 = 0
        for i in areaIndex..<Int(total) where newTable[i] == 0 { additional += 1 }
        let tableStart = startCluster + additional
        let end = tableStart + tableClusters
        var next = startCluster
        for i in areaIndex..<Int(total) {
            var b: [UInt8]
            if newTable[i] != 0 {
                b = try block(at: newTable[i])
            } else {
                b = [UInt8](repeating: 0, count: Int(clusterSize))
                newTable[i] = next * clusterSize
                next += 1
            }
            let firstCovered = UInt64(i) * entriesPerBlock
            if firstCovered < end {
                let j0 = firstCovered < startCluster ? startCluster - firstCovered : 0
                let j1 = min(end - firstCovered, entriesPerBlock)
                b.withUnsafeMutableBytes { raw in
                    for j in j0..<j1 { codec.set(raw, Int(j), 1) }
                }
            }
            try file.write(b, at: newTable[i])
            blocks[newTable[i]] = b
            dirtyBlocks.remove(newTable[i])
            blockOffsets.insert(newTable[i])
        }
        try writeDirtyBlocks()
        try file.sync()
        var tableBytes = [UInt8]()
        tableBytes.reserveCapacity(newTable.count * 8)
        for e in newTable { tableBytes.appendBE(e) }
        try file.write(tableBytes, at: tableStart * clusterSize)
        try file.sync()
        try switchTable(tableStart * clusterSize, UInt32(tableClusters))
        try file.sync()
        let oldOffset = tableOffset, oldSize = UInt64(table.count) * 8
        table = newTable
        tableOffset = tableStart * clusterSize
        self.tableClusters = UInt32(tableClusters)
        noteAllocated(end * clusterSize)
        try update(oldOffset, oldSize, addend: 1, decrease: true)
        return end
    }

    // MARK: Public operations

    /// Allocates `count` contiguous clusters with refcount 1 (QEMU's `qcow2_alloc_clusters`)
    /// and returns the host offset of the first. Their contents are not touched.
    func allocate(clusters count: UInt64) throws -> UInt64 {
        while true {
            let start = try allocNoref(count)
            do {
                try update(start * clusterSize, count * clusterSize, addend: 1, decrease: false)
                noteAllocated((start + count) * clusterSize)
                return start * clusterSize
            } catch is Again {
                continue
            }
        }
    }

    /// Takes up to `count` free clusters starting exactly at cluster `start` (QEMU's
    /// `qcow2_alloc_clusters_at`); returns how many were taken, 0 when `start` is in use.
    func allocateAt(_ start: UInt64, count: UInt64) throws -> UInt64? {
        while true {
            var n: UInt64 = 0
            while n < count, try refcount(ofCluster: start + n) == 0 { n += 1 }
            guard n > 0 else { return 0 }
            do {
                try update(start * clusterSize, n * clusterSize, addend: 1, decrease: false)
                noteAllocated((start + n) * clusterSize)
                return n
            } catch is Again {
                continue
            }
        }
    }

    /// Adds `delta` to one cluster's refcount (for clusters already in use, named by
    /// metadata: throws `Corruption` for one beyond the end of the file).
    func increment(cluster c: UInt64, by delta: Int64) throws {
        guard c <= UInt64.max >> UInt64(clusterBits) else {
            throw Corruption(description: "Cannot update refcount of cluster \(c): offset out of range")
        }
        while true {
            do {
                try update(c * clusterSize, clusterSize, addend: delta.magnitude, decrease: delta < 0, inUse: true)
                return
            } catch is Again {
                continue
            }
        }
    }

    /// Drops one reference to each cluster of `[offset, offset + length)`.
    func release(offset: UInt64, length: UInt64) throws {
        try update(offset, length, addend: 1, decrease: true, inUse: true)
    }

    /// Byte-granular allocation for compressed clusters (QEMU's `qcow2_alloc_bytes`):
    /// continues in the partly used cluster of the previous call when the stream fits or
    /// the next cluster is adjacent; every cluster touched gets +1.
    /// QEMU's `free_byte_offset`: where the next compressed stream may start (0: none).
    private var freeByteOffset: UInt64 = 0

    func allocateBytes(_ size: UInt64) throws -> UInt64 {
        var offset = freeByteOffset
        if offset != 0, try refcount(ofCluster: offset / clusterSize) == codec.maxValue { offset = 0 }
        var freeInCluster = clusterSize - offset % clusterSize
        while true {
            if offset == 0 || freeInCluster < size {
                let newCluster = try allocNoref(1) * clusterSize
                if offset == 0 || (offset + clusterSize - 1) / clusterSize * clusterSize != newCluster {
                    offset = newCluster
                    freeInCluster = clusterSize
                } else {
                    freeInCluster += clusterSize
                }
            }
            do {
                try update(offset, size, addend: 1, decrease: false)
                noteAllocated(offset + size)
                break
            } catch is Again {
                offset = 0
            }
        }
        freeByteOffset = (offset + size) % clusterSize == 0 ? 0 : offset + size
        return offset
    }

    /// QEMU's `qcow2_shrink_reftable` (after a shrink): refcount blocks that count nothing
    /// but themselves are unlinked from the table (written and synced) and then freed.
    func shrinkTable() throws {
        var newTable = table
        for i in table.indices where table[i] != 0 {
            let offset = table[i], own = offset / clusterSize
            var b = try block(at: offset)
            if own / entriesPerBlock == UInt64(i) {
                b.withUnsafeMutableBytes { codec.set($0, Int(own % entriesPerBlock), 0) }
            }
            if !b.contains(where: { $0 != 0 }) { newTable[i] = 0 }
        }
        guard newTable != table else { return }
        var bytes = [UInt8]()
        bytes.reserveCapacity(table.count * 8)
        for e in newTable { bytes.appendBE(e) }
        try file.write(bytes, at: tableOffset)
        try file.sync()
        for i in table.indices where table[i] != 0 && newTable[i] == 0 {
            let offset = table[i]
            // Freed while the table still points at the block (its own count may be in it);
            // then the block is dropped from the cache, as QEMU discards it.
            try update(offset, clusterSize, addend: 1, decrease: true)
            table[i] = 0
            blocks.removeValue(forKey: offset)
            dirtyBlocks.remove(offset)
            blockOffsets.remove(offset)
        }
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
}
