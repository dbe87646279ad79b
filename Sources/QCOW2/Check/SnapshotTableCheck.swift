import QCOW2Format

/// The snapshot table in a check (QEMU's `qcow2_check_read_snapshot_table`,
/// `qcow2_do_read_snapshots` in repair mode, and `qcow2_check_fix_snapshot_table`).
extension QCOW2Checker {
    static let snapshotHeaderSize: UInt64 = 40

    /// Reads the snapshot table without trusting it. Returns normally with corruptions
    /// counted in `res`, or throws when the table cannot be read at all.
    func readSnapshotTable(_ res: inout CheckResult) throws(CheckStop) {
        let fix = repair.contains(.errors)
        var count = UInt64(header.nbSnapshots)
        let offset = header.snapshotsOffset
        var reduced: UInt64 = 0
        var dropped = 0
        snapshots = []
        snapshotsOffset = 0
        snapshotsSize = 0

        if count > UInt64(QCOW2Limits.maxSnapshots) && fix {
            log("Discarding \(count - UInt64(QCOW2Limits.maxSnapshots)) overhanging snapshots")
            reduced += count - UInt64(QCOW2Limits.maxSnapshots)
            count = UInt64(QCOW2Limits.maxSnapshots)
        }
        // qcow2_validate_table: entry count, then offset.
        if count > UInt64(QCOW2Limits.maxSnapshots) {
            res.checkErrors += 1
            log("qcow2: ERROR snapshot table too large")
            log("You can force-remove all \(count - UInt64(QCOW2Limits.maxSnapshots)) overhanging snapshots with qemu-img check -r all")
            throw CheckStop.tooBig
        }
        if UInt64(Int64.max) - count * Self.snapshotHeaderSize < offset || offsetInCluster(offset) != 0 {
            res.checkErrors += 1
            log("qcow2: ERROR snapshot table offset invalid")
            throw CheckStop.invalid
        }

        if count > 0 {
            // The table is read from a window bounded by the file size (and by the largest
            // table QEMU accepts); anything past it reads as zeros, like reads past the end.
            let windowEnd = min(fileSize, offset &+ QCOW2Limits.maxSnapshotTableBytes + 256 * 1024)
            let window: [UInt8]
            do { window = offset < windowEnd ? try file.read(count: Int(windowEnd - offset), at: offset) : [] } catch {
                res.checkErrors += 1
                log("qcow2: ERROR failed to read the snapshot table: Failed to read snapshot table: \(CheckStop.from(error).reason)")
                throw CheckStop.from(error)
            }
            func bytes(_ at: UInt64, _ n: Int) -> [UInt8] {
                var out = [UInt8](repeating: 0, count: n)
                guard at < UInt64(window.count) else { return out }
                let m = min(n, window.count - Int(at))
                out.replaceSubrange(0..<m, with: window[Int(at)..<(Int(at) + m)])
                return out
            }
            func be(_ b: [UInt8], _ at: Int, _ n: Int) -> UInt64 { b[at..<(at + n)].reduce(0) { $0 << 8 | UInt64($1) } }

            var pos: UInt64 = 0          // relative to the table start
            var tableLength: UInt64 = 0
            var i: UInt64 = 0
            while i < count {
                let before = pos
                tableLength = (tableLength + 7) & ~7
                pos = (pos + 7) & ~7
                let h = bytes(pos, 40)
                pos += 40
                var extraSize = UInt32(be(h, 36, 4))
                let idSize = Int(be(h, 12, 2)), nameSize = Int(be(h, 14, 2))
                var truncateExtra = false
                if extraSize > QCOW2Limits.maxSnapshotExtraData {
                    if !fix {
                        res.checkErrors += 1
                        log("qcow2: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry \(i)")
                        log("You can force-remove this extra metadata with qemu-img check -r all")
                        throw CheckStop.tooBig
                    }
                    log("Discarding too much extra metadata in snapshot table entry \(i) (\(extraSize) > \(QCOW2Limits.maxSnapshotExtraData))")
                    dropped += 1
                    truncateExtra = true
                }
                let known = Int(min(24, extraSize))
                let extra = bytes(pos, known) + [UInt8](repeating: 0, count: 24 - known)
                pos += UInt64(known)
                var sn = CheckSnapshot(
                    l1TableOffset: be(h, 0, 8), l1Size: UInt32(be(h, 8, 4)), id: [], name: [],
                    dateSeconds: UInt32(be(h, 16, 4)), dateNanoseconds: UInt32(be(h, 20, 4)), vmClock: be(h, 24, 8),
                    vmStateSize: be(h, 32, 4), extraDataSize: extraSize, diskSize: header.size / 512 * 512,
                    icount: UInt64.max, unknownExtra: [])
                if extraSize >= 8 { sn.vmStateSize = be(extra, 0, 8) }
                if extraSize >= 16 { sn.diskSize = be(extra, 8, 8) }
                if extraSize >= 24 { sn.icount = be(extra, 16, 8) }
                if extraSize > 24 {
                    let extraEnd = pos + UInt64(extraSize) - 24
                    if truncateExtra { extraSize = QCOW2Limits.maxSnapshotExtraData }
                    sn.extraDataSize = extraSize
                    sn.unknownExtra = bytes(pos, Int(extraSize) - 24)
                    pos = extraEnd
                }
                // QEMU keeps them as C strings: an embedded NUL ends them.
                sn.id = Array(bytes(pos, idSize).prefix { $0 != 0 })
                pos += UInt64(idSize)
                sn.name = Array(bytes(pos, nameSize).prefix { $0 != 0 })
                pos += UInt64(nameSize)
                tableLength += 40 + UInt64(extraSize) + UInt64(idSize) + UInt64(nameSize)
                if tableLength > QCOW2Limits.maxSnapshotTableBytes || pos > UInt64(Int32.max) {
                    if !fix {
                        res.checkErrors += 1
                        log("qcow2: ERROR failed to read the snapshot table: Snapshot table is too big")
                        log("You can force-remove all \(count - i) overhanging snapshots with qemu-img check -r all")
                        throw CheckStop.tooBig
                    }
                    log("Discarding \(count - i) overhanging snapshots (snapshot table is too big)")
                    reduced += count - i
                    count = i
                    pos = before
                    break
                }
                snapshots.append(sn)
                i += 1
            }
            snapshotsOffset = offset
            snapshotsSize = pos
        }
        res.corruptions += Int(reduced) + dropped

        if reduced > 0 {
            // Shorten the table now (this leaks clusters, which the refcount check frees):
            // the rest of the check relies on the header's count.
            var be = UInt32(snapshots.count).bigEndian
            do {
                try withUnsafeBytes(of: &be) { try file.write($0, at: 60) }
                try file.sync()
            } catch {
                res.checkErrors += 1
                log("ERROR failed to update the snapshot count in the image header: \(CheckStop.from(error).reason)")
                throw CheckStop.from(error)
            }
            image.header.nbSnapshots = UInt32(snapshots.count)
            res.corruptionsFixed += Int(reduced)
            res.corruptions -= Int(reduced)
        }

        // Version 3 entries need at least the VM state size and the disk size as extra data.
        if header.version >= 3 {
            for (i, sn) in snapshots.enumerated() where sn.extraDataSize < 16 {
                res.corruptions += 1
                log("\(fixWord) snapshot table entry \(i) is incomplete")
            }
        }
    }

    /// QEMU's `qcow2_check_fix_snapshot_table`: with corruptions found in the table and
    /// `-r all`, writes the table anew (QEMU's `qcow2_write_snapshots`).
    func fixSnapshotTable(_ res: inout CheckResult) throws(CheckStop) {
        guard res.corruptions > 0, repair.contains(.errors) else { return }
        do {
            try writeSnapshotTable()
        } catch {
            let stop = CheckStop.from(error)
            res.checkErrors += 1
            log("ERROR failed to update snapshot table: \(stop.reason)")
            throw stop
        }
        res.corruptionsFixed += res.corruptions
        res.corruptions = 0
    }

    /// Writes `snapshots` to newly allocated clusters, switches the header to them and frees
    /// the old table (format doc §8.2, §14.5 rule 5).
    private func writeSnapshotTable() throws {
        var table: [UInt8] = []
        for sn in snapshots {
            table.append(contentsOf: repeatElement(0, count: (8 - table.count % 8) % 8))
            table.appendBE(sn.l1TableOffset)
            table.appendBE(sn.l1Size)
            table.appendBE(UInt16(sn.id.count))
            table.appendBE(UInt16(sn.name.count))
            table.appendBE(sn.dateSeconds)
            table.appendBE(sn.dateNanoseconds)
            table.appendBE(sn.vmClock)
            table.appendBE(sn.vmStateSize <= UInt64(UInt32.max) ? UInt32(sn.vmStateSize) : 0)
            table.appendBE(max(24, sn.extraDataSize))
            table.appendBE(sn.vmStateSize)
            table.appendBE(sn.diskSize)
            table.appendBE(sn.icount)
            if sn.extraDataSize > 24 { table.append(contentsOf: sn.unknownExtra) }
            table.append(contentsOf: sn.id)
            table.append(contentsOf: sn.name)
            guard UInt64(table.count) <= QCOW2Limits.maxSnapshotTableBytes else { throw CheckStop.tooBig }
        }
        let clusters = (UInt64(table.count) + clusterSize - 1) / clusterSize
        let newOffset = clusters > 0 ? try allocateOnDisk(clusters: clusters) : 0
        try file.sync()
        if !table.isEmpty, let hit = overlapCheck(ignoring: nil, offset: newOffset, size: UInt64(table.count)) {
            reportOverlap(hit)
            throw CheckStop.io
        }
        if !table.isEmpty { try file.write(table, at: newOffset) }
        try file.sync()
        var pointer = [UInt8]()
        pointer.appendBE(UInt32(snapshots.count))
        pointer.appendBE(newOffset)
        try file.write(pointer, at: 60)
        try file.sync()
        do {
            try freeOnDisk(offset: snapshotsOffset, size: snapshotsSize)
        } catch {
            log("qcow2_free_clusters failed: \(error.reason)")
        }
        image.header.nbSnapshots = UInt32(snapshots.count)
        image.header.snapshotsOffset = newOffset
        snapshotsOffset = newOffset
        snapshotsSize = UInt64(table.count)
        fileSize = (try? file.size()) ?? fileSize
    }
}

/// Cluster allocation on the on-disk refcounts (after the refcount check repaired them),
/// first fit like QEMU's `qcow2_alloc_clusters`.
extension QCOW2Checker {
    /// Takes `count` contiguous free clusters (refcount 0) and gives them refcount 1. A
    /// cluster whose refcount block does not exist yet gets one, placed on that very cluster
    /// (describing itself), as QEMU places it when the free space starts there.
    func allocateOnDisk(clusters count: UInt64) throws -> UInt64 {
        var run: UInt64 = 0
        var c: UInt64 = 0
        while run < count {
            let index = c / entriesPerBlock
            if index < UInt64(reftable.count), reftable[Int(index)] & Self.reftableOffsetMask == 0 {
                try createRefcountBlock(index: index, at: c)
                run = 0
                c += 1
                continue
            }
            guard index < UInt64(reftable.count) else { throw CheckStop.tooBig }
            let free = (try? onDiskRefcount(c)) == 0
            run = free ? run + 1 : 0
            c += 1
        }
        let start = c - count
        for k in start..<c { try setOnDiskRefcount(k, 1) }
        fileSize = max(fileSize, c * clusterSize)
        return start * clusterSize
    }

    /// A new refcount block at cluster `cluster`, counting itself, entered in the table.
    private func createRefcountBlock(index: UInt64, at cluster: UInt64) throws {
        var block = [UInt8](repeating: 0, count: Int(clusterSize))
        if cluster / entriesPerBlock == index {
            block.withUnsafeMutableBytes { codec.set($0, Int(cluster % entriesPerBlock), 1) }
        }
        try file.write(block, at: cluster * clusterSize)
        try file.sync()
        var be = (cluster * clusterSize).bigEndian
        try withUnsafeBytes(of: &be) { try file.write($0, at: reftableOffset + index * 8) }
        try file.sync()
        reftable[Int(index)] = cluster * clusterSize
        fileSize = max(fileSize, (cluster + 1) * clusterSize)
    }

    /// Drops one reference to every cluster of `[offset, offset + size)`; refuses (EINVAL,
    /// changing nothing) when one of them has refcount 0.
    func freeOnDisk(offset: UInt64, size: UInt64) throws(CheckStop) {
        guard size > 0 else { return }
        let first = offset / clusterSize, last = (offset + size - 1) / clusterSize
        var values: [UInt64] = []
        for c in first...last {
            let v = try onDiskRefcount(c)
            guard v > 0 else { throw CheckStop.invalid }
            values.append(v)
        }
        for (i, c) in (first...last).enumerated() {
            do { try setOnDiskRefcount(c, values[i] - 1) } catch { throw CheckStop.from(error) }
        }
    }
}
