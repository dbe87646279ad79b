import QCOW2Format

#if canImport(Glibc)
import Glibc
#endif

/// Internal snapshots (format doc §8.6), following QEMU's `qcow2_snapshot_create`,
/// `qcow2_snapshot_goto` and `qcow2_snapshot_delete`, with the same crash-safe order:
/// refcounts are raised before anything points at the new references, a new snapshot table
/// is written and synced before the header switches to it, and references are dropped only
/// after the structure that held them is gone from disk.
extension ImageWriter {
    /// The snapshot table as stored, with absent extra fields filled in as QEMU does.
    func loadSnapshots() throws -> [SnapshotTableEntry] {
        var table = try SnapshotTable.read(file: file, image: currentImage, path: layer.path)
        for i in table.indices {
            if table[i].diskSize == nil { table[i].diskSize = currentImage.header.size }
            if table[i].icount == nil { table[i].icount = UInt64.max }
        }
        return table
    }

    /// Bytes of a new snapshot's name that are kept (QEMU: `sizeof(QEMUSnapshotInfo.name) - 1`).
    static var maxNewSnapshotNameBytes: Int { 255 }

    /// Creates a snapshot of the current state; returns it.
    func createSnapshot(name: String) throws -> SnapshotTableEntry {
        try withMetadataLock {
            try ensureWritableForSnapshots()
            try flushMetadata()
            var table = try loadSnapshots()
            guard table.count < Int(QCOW2Limits.maxSnapshots) else {
                throw QCOW2Error.invalidArgument("too many snapshots (the limit is 65536)")
            }
            let h = currentImage.header
            // The active L1 exactly as on disk (flushed above), all l1_size entries.
            let l1 = try readL1(offset: h.l1TableOffset, size: h.l1Size)
            try checkRefcountHeadroom(l1)
            let l1Offset = h.l1Size > 0 ? try allocateClusters(bytes: UInt64(h.l1Size) * 8) : 0
            if h.l1Size > 0 { try writeL1(l1, at: l1Offset) }
            // Clear the copied flags of the active tree before raising the refcounts: a crash
            // in between leaves flags that are merely too cautious (refcount 1, flag clear),
            // never a copied flag on a shared cluster, which would let a write corrupt the
            // snapshot. (QEMU raises refcounts first.)
            try clearCopiedFlags(l1: l1, at: h.l1TableOffset)
            try updateSnapshotRefcount(l1: l1, addend: 1, l1Offset: h.l1TableOffset, isActive: true)
            try flushMetadata()
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            let numericIDs = table.compactMap { UInt64($0.id) }
            let id = String((numericIDs.max() ?? 0) + 1)
            // QEMU keeps a new snapshot's name in `QEMUSnapshotInfo.name[256]` (pstrcpy):
            // qemu-img snapshot -c stores at most 255 bytes of it. Do the same.
            let entry = SnapshotTableEntry(
                l1TableOffset: l1Offset, l1Size: h.l1Size, idBytes: Array(id.utf8),
                nameBytes: Array(name.utf8.prefix(Self.maxNewSnapshotNameBytes)), dateSeconds: UInt32(truncatingIfNeeded: now.tv_sec),
                dateNanoseconds: UInt32(truncatingIfNeeded: now.tv_nsec), vmClockNanoseconds: 0, vmStateSize: 0,
                diskSize: h.size, icount: 0)
            table.append(entry)
            try writeSnapshotTable(table)
            return entry
        }
    }

    /// Reverts the active state to a snapshot (by ID or name). The image must be reopened
    /// afterwards to see the snapshot's virtual size.
    func applySnapshot(_ key: String) throws {
        try withMetadataLock {
            try ensureWritableForSnapshots()
            try flushMetadata()
            let table = try loadSnapshots()
            guard let sn = SnapshotTable.find(key, in: table) else {
                throw QCOW2Error.invalidArgument("Could not apply snapshot '\(key)': snapshot not found")
            }
            guard sn.l1TableOffset % cs == 0, UInt64(sn.l1Size) <= QCOW2Limits.maxL1Entries else {
                throw QCOW2Error.corrupt(path: layer.path, "snapshot '\(key)' has an invalid L1 table")
            }
            // As QEMU: first resize the active state to the snapshot's size (shrinking
            // discards past the new end, copying L2 tables shared with snapshots), then
            // switch the L1 table.
            if let size = sn.diskSize, size != currentImage.header.size {
                try resizeLocked(to: size, allowShrink: true)
            }
            let snL1 = try readL1(offset: sn.l1TableOffset, size: sn.l1Size)
            try checkInsideFile(snL1)
            var h = currentImage.header
            if sn.l1Size > h.l1Size { try growActiveL1(to: sn.l1Size) }
            h = currentImage.header
            let oldActive = try readL1(offset: h.l1TableOffset, size: h.l1Size)
            try updateSnapshotRefcount(l1: snL1, addend: 1, l1Offset: sn.l1TableOffset, isActive: false)
            // The snapshot's L1 may carry stale copied flags: install it with them cleared,
            // then recompute them once the old tree's references are gone.
            var newActive = snL1.map { $0 & ~L1Entry.copiedFlag } + [UInt64](repeating: 0, count: Int(h.l1Size) - snL1.count)
            try writeL1(newActive, at: h.l1TableOffset)
            try syncFile()
            setActiveL1(newActive)
            try updateSnapshotRefcount(l1: oldActive, addend: -1, l1Offset: h.l1TableOffset, isActive: false, writeBack: false)
            newActive = try readL1(offset: h.l1TableOffset, size: h.l1Size)
            try updateSnapshotRefcount(l1: newActive, addend: 0, l1Offset: h.l1TableOffset, isActive: true)
            if let size = sn.diskSize, size != h.size { try setVirtualSizeField(size) }
            try flushMetadata()
            invalidateAll()
        }
    }

    /// Deletes a snapshot (by ID or name) and releases what only it referenced.
    func deleteSnapshot(_ key: String) throws {
        try withMetadataLock {
            try ensureWritableForSnapshots()
            try flushMetadata()
            var table = try loadSnapshots()
            // qemu-img snapshot -d looks the snapshot up by name only.
            guard let index = table.firstIndex(where: { $0.hasName(key) }) else {
                throw QCOW2Error.invalidArgument("Could not delete snapshot '\(key)': snapshot not found")
            }
            let sn = table.remove(at: index)
            try writeSnapshotTable(table)
            let snL1 = try readL1(offset: sn.l1TableOffset, size: sn.l1Size)
            try updateSnapshotRefcount(l1: snL1, addend: -1, l1Offset: sn.l1TableOffset, isActive: false, writeBack: false)
            let h = currentImage.header
            let active = try readL1(offset: h.l1TableOffset, size: h.l1Size)
            try updateSnapshotRefcount(l1: active, addend: 0, l1Offset: h.l1TableOffset, isActive: true)
            if sn.l1Size > 0 { try releaseNow(offset: sn.l1TableOffset, length: UInt64(sn.l1Size) * 8) }
            try flushMetadata()
        }
    }

    /// Recomputes the copied flags of the active tree from the refcounts (after a refcount
    /// rebuild of a dirty image, flags left cautious by an interrupted snapshot operation
    /// must be set again).
    func recomputeActiveCopiedFlags() throws {
        try withMetadataLock {
            let h = currentImage.header
            let active = try readL1(offset: h.l1TableOffset, size: h.l1Size)
            try updateSnapshotRefcount(l1: active, addend: 0, l1Offset: h.l1TableOffset, isActive: true)
            try flushMetadata()
        }
    }

    /// The snapshot half of a downgrade to v2: zero clusters in every snapshot's L2 tables
    /// are expanded on disk (QEMU's qcow2_expand_zero_clusters after the active tables).
    func expandZeroClustersInSnapshots() throws {
        let g = geometry
        for sn in try loadSnapshots() {
            guard sn.l1TableOffset % cs == 0, UInt64(sn.l1Size) <= QCOW2Limits.maxL1Entries else {
                throw QCOW2Error.corrupt(path: layer.path, "snapshot '\(sn.name)' has an invalid L1 table")
            }
            for (l1i, raw) in try readL1(offset: sn.l1TableOffset, size: sn.l1Size).enumerated() {
                let l2 = L1Entry(rawValue: raw).l2Offset
                guard l2 != 0 else { continue }
                guard l2 % cs == 0 else {
                    throw QCOW2Error.corrupt(path: layer.path, "snapshot '\(sn.name)': L2 table offset 0x\(String(l2, radix: 16)) unaligned")
                }
                var table = try file.read(count: Int(cs), at: l2)
                let l2Refcount = try refcountOf(l2 / cs)
                var changed = false
                var releases: [(cluster: UInt64, count: UInt64)] = []
                for index in 0..<Int(g.l2Entries) {
                    let e = table.withUnsafeBytes { L2Entry(rawValue: loadBE64($0, index * 8)) }
                    guard e.rawValue != 0 else { continue }
                    let guest = (UInt64(l1i) << UInt64(g.clusterBits + g.l2EntriesBits)) + UInt64(index) * cs
                    guard let expanded = try expandedZeroEntry(e, at: guest, l2Refcount: l2Refcount) else { continue }
                    table.withUnsafeMutableBytes { $0.storeBytes(of: expanded.entry.rawValue.bigEndian, toByteOffset: index * 8, as: UInt64.self) }
                    if let r = expanded.release { releases.append(r) }
                    changed = true
                }
                guard changed else { continue }
                // New clusters' refcounts and their zeros reach the disk before the table
                // does; references the table dropped are released only after it is durable.
                try syncFile()
                try file.write(table, at: l2)
                l2Cache.invalidate(layer: layer.index, table: l2, tableSize: cs)
                if !releases.isEmpty {
                    try syncFile()
                    for r in releases { try adjustRefcount(r.cluster, by: -Int64(r.count)) }
                }
            }
        }
        try syncFile()
    }

    /// Whether the active tree or any snapshot's tree references a compressed cluster.
    func hasCompressedClusters() throws -> Bool {
        let h = currentImage.header
        var tables = [try readL1(offset: h.l1TableOffset, size: h.l1Size)]
        for sn in try loadSnapshots() where sn.l1TableOffset % cs == 0 && UInt64(sn.l1Size) <= QCOW2Limits.maxL1Entries {
            tables.append(try readL1(offset: sn.l1TableOffset, size: sn.l1Size))
        }
        for l1 in tables {
            for raw in l1 {
                let l2 = L1Entry(rawValue: raw).l2Offset
                guard l2 != 0, l2 % cs == 0 else { continue }
                var found = false
                try forEachEntry(ofTable: l2) { _, _, kind in
                    if case .compressed = kind { found = true }
                }
                if found { return true }
            }
        }
        return false
    }

    // MARK: Helpers

    private func readL1(offset: UInt64, size: UInt32) throws -> [UInt64] {
        guard size > 0 else { return [] }
        var l1 = [UInt64](repeating: 0, count: Int(size))
        try l1.withUnsafeMutableBytes { try file.read(into: $0, at: offset) }
        return l1.map { UInt64(bigEndian: $0) }
    }

    private func writeL1(_ l1: [UInt64], at offset: UInt64) throws {
        var bytes = [UInt8]()
        bytes.reserveCapacity(l1.count * 8)
        for e in l1 { bytes.appendBE(e) }
        try file.write(bytes, at: offset)
    }

    /// Every cluster the L1 tree references must be able to take one more reference
    /// (refcount_bits = 1 images cannot hold snapshots).
    /// Also: every one lies inside the file, checked before any refcount changes.
    private func checkRefcountHeadroom(_ l1: [UInt64]) throws {
        // A host cluster can be referenced several times (compressed clusters sharing it):
        // count every reference the snapshot adds before checking.
        var added: [UInt64: UInt64] = [:]
        try walk(l1) { cluster in added[cluster, default: 0] += 1 }
        try requireInsideFile(clusters: added.keys.sorted(), what: "Cannot update snapshot refcounts")
        let maxValue = refcountMaximum
        if maxValue >= UInt64(UInt32.max) { return }
        for (cluster, n) in added where try refcountOf(cluster) + n > maxValue {
            throw QCOW2Error.invalidArgument("Could not create snapshot: the refcount width (\(refcountWidth) bits) is too small to share cluster \(cluster)")
        }
    }

    /// Every cluster the L1 tree references lies inside the file (before refcounting them).
    private func checkInsideFile(_ l1: [UInt64]) throws {
        var clusters = Set<UInt64>()
        try walk(l1) { clusters.insert($0) }
        try requireInsideFile(clusters: clusters.sorted(), what: "Cannot update snapshot refcounts")
    }

    /// Calls `body` for every host cluster the L1 tree references (L2 tables and data).
    private func walk(_ l1: [UInt64], _ body: (UInt64) throws -> Void) throws {
        for raw in l1 {
            let l2 = L1Entry(rawValue: raw).l2Offset
            guard l2 != 0 else { continue }
            try body(l2 / cs)
            try forEachEntry(ofTable: l2) { _, entry, kind in
                switch kind {
                case let .normal(h), let .zeroAllocated(h): try body(h / cs)
                case let .compressed(d):
                    let start = d.hostOffset & ~511, end = d.hostOffset + d.compressedSize
                    for c in (start / cs)...((end - 1) / cs) { try body(c) }
                default: break
                }
                _ = entry
            }
        }
    }

    /// QEMU's `qcow2_update_snapshot_refcount`: adds `addend` to every cluster the L1 tree
    /// references, then recomputes the copied flags (in L2 tables and in the L1 array,
    /// which is written back to the table on disk, and to memory for the active one).
    private func updateSnapshotRefcount(l1: [UInt64], addend: Int64, l1Offset: UInt64, isActive: Bool, writeBack: Bool = true) throws {
        var newL1 = l1
        for (i, raw) in l1.enumerated() {
            let l2 = L1Entry(rawValue: raw).l2Offset
            guard l2 != 0 else { continue }
            guard l2 % cs == 0 else { throw QCOW2Error.corrupt(path: layer.path, "L2 table offset 0x\(String(l2, radix: 16)) unaligned (L1 index \(i))") }
            try forEachEntry(ofTable: l2) { index, entry, kind in
                var updated = entry
                switch kind {
                case let .compressed(d):
                    if addend != 0 {
                        let start = d.hostOffset & ~511, end = d.hostOffset + d.compressedSize
                        for c in (start / cs)...((end - 1) / cs) { try adjustRefcount(c, by: addend) }
                    }
                case let .normal(h), let .zeroAllocated(h):
                    if addend != 0 { try adjustRefcount(h / cs, by: addend) }
                    let rc = try refcountOf(h / cs)
                    updated.rawValue = rc == 1 ? entry.rawValue | L2Entry.copiedFlag : entry.rawValue & ~L2Entry.copiedFlag
                default:
                    break
                }
                if updated != entry { setTableEntry(l2, index, updated) }
            }
            if addend != 0 { try adjustRefcount(l2 / cs, by: addend) }
            let rc = try refcountOf(l2 / cs)
            newL1[i] = L1Entry(l2Offset: l2, copied: rc == 1).rawValue
        }
        if writeBack, newL1 != l1 {
            try flushMetadata()
            try writeL1(newL1, at: l1Offset)
            try syncFile()
            if isActive { setActiveL1(newL1) }
        }
    }

    /// Clears the copied flag in every L2 entry and L1 entry of the active tree, on disk.
    private func clearCopiedFlags(l1: [UInt64], at l1Offset: UInt64) throws {
        for raw in l1 {
            let l2 = L1Entry(rawValue: raw).l2Offset
            guard l2 != 0 else { continue }
            try forEachEntry(ofTable: l2) { index, entry, _ in
                if entry.isCopied && !entry.isCompressed {
                    setTableEntry(l2, index, L2Entry(rawValue: entry.rawValue & ~L2Entry.copiedFlag, bitmap: entry.bitmap))
                }
            }
        }
        try flushMetadata()
        let cleared = l1.map { $0 & ~L1Entry.copiedFlag }
        if cleared != l1 {
            try writeL1(cleared, at: l1Offset)
            try syncFile()
            setActiveL1(cleared)
        }
    }

    private func forEachEntry(ofTable l2: UInt64, _ body: (Int, L2Entry, ClusterKind) throws -> Void) throws {
        try loadTableForSnapshot(l2)
        for index in 0..<Int(geometry.l2Entries) {
            let e = tableEntry(l2, index)
            guard e.rawValue != 0 || e.bitmap != 0 else { continue }
            let kind: ClusterKind
            do {
                kind = try e.clusterKind(geometry: geometry, version: currentImage.header.version, externalData: false)
            } catch {
                throw QCOW2Error.corrupt(path: layer.path, "L2 table 0x\(String(l2, radix: 16)) entry \(index): \(error)")
            }
            try body(index, e, kind)
        }
    }

    /// Writes a new snapshot table in fresh clusters, switches the header (12 bytes at 60),
    /// then frees the old table.
    private func writeSnapshotTable(_ table: [SnapshotTableEntry]) throws {
        let old = currentImage.header
        let oldSize = UInt64(try SnapshotTable.read(file: file, image: currentImage, path: layer.path).isEmpty ? 0 :
            SnapshotTableEntry.tableSize(try SnapshotTable.read(file: file, image: currentImage, path: layer.path)))
        let bytes = SnapshotTableEntry.serializeTable(table)
        guard UInt64(bytes.count) <= QCOW2Limits.maxSnapshotTableBytes else { throw QCOW2Error.invalidArgument("snapshot table is too big") }
        var offset: UInt64 = 0
        if !table.isEmpty {
            offset = try allocateClusters(bytes: UInt64(bytes.count))
            try file.write(bytes, at: offset)
        }
        try syncFile()
        var pair: [UInt8] = []
        pair.appendBE(UInt32(table.count))
        pair.appendBE(offset)
        try file.write(pair, at: 60)
        try syncFile()
        setSnapshotFields(count: UInt32(table.count), offset: offset)
        if old.nbSnapshots > 0 && old.snapshotsOffset != 0 && oldSize > 0 {
            try releaseNow(offset: old.snapshotsOffset, length: oldSize)
        }
    }
}
