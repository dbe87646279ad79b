import QCOW2Format

/// A rebuild that could not be completed (QEMU's `Error` from `rebuild_refcount_structure`).
struct RebuildError: Error {
    var what: String
    var code: Int32
    var message: String { "\(what): \(errnoDescription(code))" }
}

/// Writing a new refcount structure from the counted references (QEMU's
/// `rebuild_refcount_structure` as of 7.1, with its placement rules, so that the result is
/// laid out as qemu-img lays it out).
///
/// Every allocated cluster's refcount block is the matching cluster-sized slice of the
/// reference table, which already holds the right refcounts. Blocks are placed first fit
/// (never before the range they describe), then the table first fit from the start of the
/// file; placing the table can need more blocks (and a bigger table), so that step repeats
/// until the table stops growing. Only then does one header write switch to the new
/// structure; the old one becomes leaked clusters, which the caller frees.
///
/// Unlike QEMU, clusters holding the old refcount table or blocks are never reused even when
/// nothing references them (QEMU's overlap check would then refuse the write and fail the
/// repair): the old structure stays intact until the switch.
extension QCOW2Checker {
    func rebuildRefcountStructure(_ res: inout CheckResult, _ table: inout ReferenceTable) throws(RebuildError) {
        dropRefcountCache()
        let avoid = oldRefcountStructureClusters()
        var newTable: [UInt64] = []
        do throws(RebuildError) {
            var grown = try writeRefcountBlocks(&table, from: 0, to: table.count, into: &newTable, avoiding: avoid)
            guard grown else { throw RebuildError(what: "ERROR rebuilding the refcount structure: no refcount table was produced", code: CheckStop.invalid.code) }
            var tableOffset: UInt64 = 0
            var tableClusters: UInt64 = 0
            repeat {
                var firstFree: UInt64 = 0
                tableClusters = (UInt64(newTable.count) * 8 + clusterSize - 1) / clusterSize
                guard tableClusters * clusterSize <= QCOW2Limits.maxRefcountTableBytes else {
                    throw RebuildError(what: "ERROR allocating reftable", code: CheckStop.tooBig.code)
                }
                tableOffset = allocate(&table, count: tableClusters, firstFree: &firstFree, avoiding: avoid)
                let start = tableOffset / clusterSize
                grown = try writeRefcountBlocks(&table, from: start, to: start + tableClusters, into: &newTable, avoiding: avoid)
            } while grown

            var bytes = [UInt8]()
            bytes.reserveCapacity(newTable.count * 8)
            for e in newTable { bytes.appendBE(e) }
            do {
                try file.write(bytes, at: tableOffset)
                try file.sync()
            } catch {
                throw RebuildError(what: "ERROR writing reftable", code: CheckStop.from(error).code)
            }
            var pointer = [UInt8]()
            pointer.appendBE(tableOffset)
            pointer.appendBE(UInt32(tableClusters))
            do {
                try file.write(pointer, at: 48)
                try file.sync()
            } catch {
                throw RebuildError(what: "ERROR setting reftable", code: CheckStop.from(error).code)
            }
            reftable = newTable
            reftableOffset = tableOffset
            reftableSize = UInt64(newTable.count)
            image.header.refcountTableOffset = tableOffset
            image.header.refcountTableClusters = UInt32(tableClusters)
            fileSize = (try? file.size()) ?? fileSize
        } catch {
            res.checkErrors += 1
            throw error
        }
    }

    /// Clusters of the current refcount table and blocks (whatever their alignment).
    private func oldRefcountStructureClusters() -> Set<UInt64> {
        var out = Set<UInt64>()
        func add(_ offset: UInt64, _ size: UInt64) {
            guard size > 0, offset < fileSize else { return }
            let last = (min(offset + size, fileSize) - 1) >> clusterBits
            for c in (offset >> clusterBits)...last { out.insert(c) }
        }
        add(reftableOffset, reftableSize * 8)
        for e in reftable where e & Self.reftableOffsetMask != 0 { add(e & Self.reftableOffsetMask, clusterSize) }
        return out
    }

    /// QEMU's `alloc_clusters_imrt`: `count` contiguous clusters that are free in the table,
    /// first fit from `firstFree` (which moves to the first gap seen), taken with refcount 1.
    private func allocate(_ table: inout ReferenceTable, count: UInt64, firstFree: inout UInt64,
                          avoiding avoid: Set<UInt64>) -> UInt64 {
        var cluster = firstFree
        var contiguous: UInt64 = 0
        var firstGap = true
        while cluster < table.count && contiguous < count {
            if table[cluster] == 0 && !avoid.contains(cluster) {
                contiguous += 1
                if firstGap {
                    firstFree = cluster
                    firstGap = false
                }
            } else {
                contiguous = 0
            }
            cluster += 1
        }
        if contiguous < count { table.resize(to: cluster + count - contiguous) }
        cluster -= contiguous
        for i in 0..<count { table[cluster + i] = 1 }
        return cluster * clusterSize
    }

    /// QEMU's `rebuild_refcounts_write_refblocks`: writes the refcount blocks covering the
    /// clusters in use in `[first, end)`, allocating those not in `newTable` yet. Returns
    /// whether `newTable` had to grow.
    private func writeRefcountBlocks(_ table: inout ReferenceTable, from first: UInt64, to end: UInt64,
                                     into newTable: inout [UInt64], avoiding avoid: Set<UInt64>) throws(RebuildError) -> Bool {
        var end = end
        var firstFree: UInt64 = 0
        var grown = false
        var cluster = first
        let perTableCluster = Int(clusterSize / 8)
        while cluster < end {
            if table[cluster] == 0 {
                cluster += 1
                continue
            }
            let index = cluster / entriesPerBlock
            let blockStart = index * entriesPerBlock
            let blockOffset: UInt64
            if index < UInt64(newTable.count), newTable[Int(index)] != 0 {
                blockOffset = newTable[Int(index)]
            } else {
                // Never inside a block already written.
                if firstFree < blockStart { firstFree = blockStart }
                blockOffset = allocate(&table, count: 1, firstFree: &firstFree, avoiding: avoid)
                // The block holding the new block's own refcount must be written too.
                if blockOffset / clusterSize >= end { end = blockOffset / clusterSize + 1 }
                if UInt64(newTable.count) <= index {
                    let entries = (Int(index) + perTableCluster) / perTableCluster * perTableCluster
                    newTable.append(contentsOf: repeatElement(0, count: entries - newTable.count))
                    grown = true
                }
                newTable[Int(index)] = blockOffset
            }
            do {
                try Array(table.block(index)).withUnsafeBytes { try file.write($0, at: blockOffset) }
            } catch {
                throw RebuildError(what: "ERROR writing refblock", code: CheckStop.from(error).code)
            }
            cluster = blockStart + entriesPerBlock
        }
        return grown
    }
}
