import QCOW2Format

/// Comparing the counted references with the on-disk refcounts, the copied flags, and the
/// repairs (QEMU's `qcow2_check_refcounts`, `compare_refcounts`, `check_oflag_copied`,
/// `rebuild_refcount_structure`).
extension QCOW2Checker {
    /// QEMU's `qcow2_check_refcounts`.
    func checkRefcounts(_ res: inout CheckResult) throws(CheckStop) {
        let clusters = (fileSize + clusterSize - 1) / clusterSize
        guard clusters <= UInt64(Int32.max) else {
            res.checkErrors += 1
            throw CheckStop.tooBig
        }
        let sectors = header.size / 512
        res.totalClusters = Int64((sectors * 512 + clusterSize - 1) / clusterSize)

        var table = ReferenceTable(order: header.refcountOrder, clusterSize: Int(clusterSize), clusters: clusters)
        var rebuild = false
        try calculateReferences(&res, &table, repair: repair, rebuild: &rebuild)

        // Without a rebuild but with something to repair, the comparison runs again below
        // with repairs enabled, starting from this result.
        let preCompare = res
        var highest = compareRefcounts(&res, table, repair: [], rebuild: &rebuild)

        if rebuild && repair.contains(.errors) {
            let old = res
            var freshLeaks = 0
            log("Rebuilding refcount structure")
            do {
                try rebuildRefcountStructure(&res, &table)
            } catch {
                log("qcow2: \(error.message)")
                throw CheckStop(code: error.code)
            }
            // The on-disk refcounts read through the old structure no longer matter.
            res.checkErrors -= refcountReadErrors
            refcountReadErrors = 0
            res.corruptions = 0
            res.leaks = 0
            // The refcount table changed: count the references again.
            rebuild = false
            table.clear()
            try calculateReferences(&res, &table, repair: [], rebuild: &rebuild)
            if repair.contains(.leaks) {
                // The old structures are leaked now; free them. Only leaks the rebuild
                // itself made and could not fix count.
                let saved = res
                res = CheckResult()
                highest = compareRefcounts(&res, table, repair: .leaks, rebuild: &rebuild)
                if rebuild { log("ERROR rebuilt refcount structure is still broken") }
                freshLeaks = res.leaks
                res = saved
            }
            if res.corruptions < old.corruptions { res.corruptionsFixed += old.corruptions - res.corruptions }
            if res.leaks < old.leaks { res.leaksFixed += old.leaks - res.leaks }
            res.leaks += freshLeaks
        } else if !repair.isEmpty {
            if rebuild {
                log("ERROR need to rebuild refcount structures")
                res.checkErrors += 1
                throw CheckStop.io
            }
            if res.leaks != 0 || res.corruptions != 0 {
                res = preCompare
                refcountReadErrors = 0
                highest = compareRefcounts(&res, table, repair: repair, rebuild: &rebuild)
            }
        }

        try checkCopiedFlags(&res)
        res.imageEndOffset = Int64((highest + 1) * clusterSize)
    }

    /// QEMU's `compare_refcounts`; returns the highest cluster in use.
    func compareRefcounts(_ res: inout CheckResult, _ table: ReferenceTable, repair: CheckRepair,
                          rebuild: inout Bool) -> UInt64 {
        var highest: UInt64 = 0
        var i: UInt64 = 0
        while i < table.count {
            defer { i += 1 }
            let onDisk: UInt64
            do { onDisk = try onDiskRefcount(i) } catch {
                log("Can't get refcount for cluster \(i): \(error.reason)")
                res.checkErrors += 1
                refcountReadErrors += 1
                continue
            }
            let expected = table[i]
            if onDisk > 0 || expected > 0 { highest = i }
            guard onDisk != expected else { continue }
            var fixLeak = false, fixCorruption = false
            if onDisk == 0 {
                rebuild = true
            } else if onDisk > expected && repair.contains(.leaks) {
                fixLeak = true
            } else if onDisk < expected && repair.contains(.errors) {
                fixCorruption = true
            }
            let word = fixLeak || fixCorruption ? "Repairing" : (onDisk < expected ? "ERROR" : "Leaked")
            log("\(word) cluster \(i) refcount=\(onDisk) reference=\(expected)")
            if fixLeak || fixCorruption {
                if (try? setOnDiskRefcount(i, expected)) != nil {
                    if fixLeak { res.leaksFixed += 1 } else { res.corruptionsFixed += 1 }
                    continue
                }
            }
            if onDisk < expected { res.corruptions += 1 } else { res.leaks += 1 }
        }
        return highest
    }

    /// QEMU's `check_oflag_copied`: in the active tree, the copied flag of an L1 entry is set
    /// exactly when its L2 table has refcount 1, and that of a data cluster exactly when the
    /// cluster has refcount 1 (always with an external data file).
    func checkCopiedFlags(_ res: inout CheckResult) throws(CheckStop) {
        let fix: Bool
        if repair.contains(.errors) {
            fix = true
        } else if repair.contains(.leaks) {
            // Safe only if the refcounts are right now.
            fix = res.checkErrors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            fix = false
        }
        let word = fix ? "Repairing" : "ERROR"
        for i in l1.indices {
            let l1Entry = l1[i]
            let l2Offset = l1Entry & Self.l1OffsetMask
            guard l2Offset != 0 else { continue }
            if let refcount = try? onDiskRefcount(l2Offset >> clusterBits),
               (refcount == 1) != (l1Entry & Self.copied != 0) {
                res.corruptions += 1
                log("\(word) OFLAG_COPIED L2 cluster: l1_index=\(i) l1_entry=\(Self.hex(l1Entry)) refcount=\(refcount)")
                if fix {
                    let fixed = refcount == 1 ? l1Entry | Self.copied : l1Entry & ~Self.copied
                    do {
                        try writeL1Entry(i, fixed)
                    } catch {
                        res.checkErrors += 1
                        throw error
                    }
                    res.corruptions -= 1
                    res.corruptionsFixed += 1
                }
            }

            var l2: [UInt8]
            do { l2 = try file.read(count: Int(clusterSize), at: l2Offset) } catch {
                let stop = CheckStop.from(error)
                log("ERROR: Could not read L2 table: \(stop.reason)")
                res.checkErrors += 1
                throw stop
            }
            var dirty = 0
            for j in 0..<l2Entries {
                let entry = l2.withUnsafeBytes { loadBE64($0, j * l2EntrySize) }
                let type = entryType(entry)
                guard type == .normal || type == .zeroAllocated else { continue }
                let refcount: UInt64
                if hasDataFile {
                    refcount = 1
                } else {
                    guard let r = try? onDiskRefcount((entry & Self.l2OffsetMask) >> clusterBits) else { continue }
                    refcount = r
                }
                guard (refcount == 1) != (entry & Self.copied != 0) else { continue }
                res.corruptions += 1
                log("\(word) OFLAG_COPIED data cluster: l2_entry=\(Self.hex(entry)) refcount=\(refcount)")
                if fix {
                    l2.putBE(refcount == 1 ? entry | Self.copied : entry & ~Self.copied, at: j * l2EntrySize)
                    dirty += 1
                }
            }
            if dirty > 0 {
                if let hit = overlapCheck(ignoring: .activeL2, offset: l2Offset, size: clusterSize) {
                    reportOverlap(hit)
                    log("ERROR: Could not write L2 table; metadata overlap check failed: \(CheckStop.io.reason)")
                    res.checkErrors += 1
                    throw CheckStop.io
                }
                do { try file.write(l2, at: l2Offset) } catch {
                    let stop = CheckStop.from(error)
                    log("ERROR: Could not write L2 table: \(stop.reason)")
                    res.checkErrors += 1
                    throw stop
                }
                fileSize = max(fileSize, l2Offset + clusterSize)
                res.corruptions -= dirty
                res.corruptionsFixed += dirty
            }
        }
    }

    /// QEMU's `qcow2_write_l1_entry` (which writes the 512-byte sector holding the entry;
    /// the other entries of that sector are unchanged, so writing the entry is the same).
    func writeL1Entry(_ index: Int, _ value: UInt64) throws(CheckStop) {
        let offset = header.l1TableOffset + UInt64(index) * 8
        if let hit = overlapCheck(ignoring: .activeL1, offset: offset & ~511, size: 512) {
            reportOverlap(hit)
            throw CheckStop.io
        }
        var be = value.bigEndian
        do {
            try withUnsafeBytes(of: &be) { try file.write($0, at: offset) }
            try file.sync()
        } catch { throw CheckStop.from(error) }
        l1[index] = value
    }
}
