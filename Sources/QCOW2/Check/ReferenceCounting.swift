import QCOW2Format

/// Counting references (QEMU's `calculate_refcounts` and the functions it calls).
extension QCOW2Checker {
    /// What an L2 entry maps (QEMU's `qcow2_get_cluster_type`, which, unlike reading,
    /// accepts the zero flag in any version).
    enum EntryType { case unallocated, zeroPlain, zeroAllocated, normal, compressed }

    func entryType(_ e: UInt64) -> EntryType {
        if e & Self.compressed != 0 { return .compressed }
        if e & Self.zero != 0 && !extendedL2 {
            return e & Self.l2OffsetMask != 0 ? .zeroAllocated : .zeroPlain
        }
        if e & Self.l2OffsetMask == 0 {
            return hasDataFile && e & Self.copied != 0 ? .normal : .unallocated
        }
        return .normal
    }

    /// Bits of a compressed descriptor: the host offset is below `csizeShift`.
    var csizeShift: UInt64 { 62 - (clusterBits - 8) }
    var compressedOffsetMask: UInt64 { (1 << csizeShift) - 1 }

    /// QEMU's `qcow2_parse_compressed_l2_entry`: (host offset, bytes).
    func compressedRange(_ e: UInt64) -> (UInt64, UInt64) {
        let offset = e & compressedOffsetMask
        let sectors = ((e >> csizeShift) & ((1 << (clusterBits - 8)) - 1)) + 1
        return (offset, sectors * 512 - (offset & 511))
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: one more reference to every cluster touched by
    /// `[offset, offset + size)`. A range ending one cluster or more past the end of the file
    /// is a corruption and is not counted, which bounds the table by the file size.
    func countReference(_ res: inout CheckResult, _ table: inout ReferenceTable, offset: UInt64, size: UInt64) {
        guard size > 0 else { return }
        let (end, overflow) = offset.addingReportingOverflow(size)
        if overflow || offset > UInt64(Int64.max) || end >= fileSize + clusterSize {
            log("ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x\(Self.hex(offset)) size 0x\(Self.hex(size))")
            res.corruptions += 1
            return
        }
        for k in (offset >> clusterBits)...((end - 1) >> clusterBits) {
            let v = table[k]
            if v == table.maxValue {
                log("ERROR: overflow cluster offset=0x\(Self.hex(k << clusterBits))")
                log("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing")
                res.corruptions += 1
                continue
            }
            table[k] = v + 1
        }
    }

    /// QEMU's `calculate_refcounts`: counts everything the header reaches. Sets `rebuild`
    /// when the refcount structure itself is broken.
    func calculateReferences(_ res: inout CheckResult, _ table: inout ReferenceTable, repair: CheckRepair,
                             rebuild: inout Bool) throws(CheckStop) {
        fileSize = (try? file.size()) ?? fileSize
        let h = header
        countReference(&res, &table, offset: 0, size: clusterSize)
        try countL1(&res, &table, offset: h.l1TableOffset, size: h.l1Size, active: true, repair: repair)

        if hasDataFile && !snapshots.isEmpty {
            log("ERROR \(snapshots.count) snapshots in image with data file")
            res.corruptions += 1
        }
        for sn in snapshots {
            if offsetInCluster(sn.l1TableOffset) != 0 {
                log("ERROR snapshot \(sn.idString) (\(sn.nameString)) l1_offset=\(Self.altHex(sn.l1TableOffset)): L1 table is not cluster aligned; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            }
            if UInt64(sn.l1Size) > QCOW2Limits.maxL1Entries {
                log("ERROR snapshot \(sn.idString) (\(sn.nameString)) l1_size=\(Self.altHex(UInt64(sn.l1Size))): L1 table is too large; snapshot table entry corrupted")
                res.corruptions += 1
                continue
            }
            try countL1(&res, &table, offset: sn.l1TableOffset, size: sn.l1Size, active: false, repair: repair)
        }
        countReference(&res, &table, offset: snapshotsOffset, size: snapshotsSize)
        countReference(&res, &table, offset: reftableOffset, size: reftableSize * 8)
        if let fde = image.fullDiskEncryption, fde.length > 0 {
            countReference(&res, &table, offset: fde.offset, size: fde.length)
        }
        try countBitmaps(&res, &table)
        try checkRefcountBlocks(&res, &table, repair: repair, rebuild: &rebuild)
    }

    /// QEMU's `check_refcounts_l1`: the table, its L2 tables and what they map.
    func countL1(_ res: inout CheckResult, _ table: inout ReferenceTable, offset: UInt64, size: UInt32,
                 active: Bool, repair: CheckRepair) throws(CheckStop) {
        guard size > 0 else { return }
        countReference(&res, &table, offset: offset, size: UInt64(size) * 8)
        // Read in slices so that memory follows the file, not l1_size; entries past the end
        // of the file read as zeros and map nothing.
        let slice: UInt64 = 8192
        var index: UInt64 = 0
        let total = UInt64(size)
        while index < total {
            let start = offset &+ index * 8
            guard start < fileSize, start >= offset else { break }
            let n = min(slice, total - index)
            let entries: [UInt64]
            do { entries = try readTable(offset: start, entries: n) } catch {
                log("ERROR: I/O error in check_refcounts_l1")
                res.checkErrors += 1
                throw CheckStop.from(error)
            }
            for e in entries where e != 0 {
                if e & Self.l1ReservedMask != 0 {
                    log("ERROR found L1 entry with reserved bits set: \(Self.hex(e))")
                    res.corruptions += 1
                }
                let l2 = e & Self.l1OffsetMask
                countReference(&res, &table, offset: l2, size: clusterSize)
                if offsetInCluster(l2) != 0 {
                    log("ERROR l2_offset=\(Self.hex(l2)): Table is not cluster aligned; L1 entry corrupted")
                    res.corruptions += 1
                }
                try countL2(&res, &table, l2Offset: l2, active: active, repair: repair)
            }
            index += n
        }
    }

    /// QEMU's `check_refcounts_l2`.
    func countL2(_ res: inout CheckResult, _ table: inout ReferenceTable, l2Offset: UInt64,
                 active: Bool, repair: CheckRepair) throws(CheckStop) {
        var l2: [UInt8]
        do { l2 = try file.read(count: Int(clusterSize), at: l2Offset) } catch {
            log("ERROR: I/O error in check_refcounts_l2")
            res.checkErrors += 1
            throw CheckStop.from(error)
        }
        var nextContiguous: UInt64 = 0
        for i in 0..<l2Entries {
            let (entry0, bitmap) = l2.withUnsafeBytes { raw in
                (loadBE64(raw, i * l2EntrySize), extendedL2 ? loadBE64(raw, i * l2EntrySize + 8) : 0)
            }
            var entry = entry0
            let type = entryType(entry)
            if type != .compressed && entry & Self.l2ReservedMask != 0 {
                log("ERROR found l2 entry with reserved bits set: \(Self.hex(entry))")
                res.corruptions += 1
            }
            switch type {
            case .compressed:
                if entry & Self.copied != 0 {
                    log("ERROR: coffset=0x\(Self.hex(entry & compressedOffsetMask)): copied flag must never be set for compressed clusters")
                    entry &= ~Self.copied
                    res.corruptions += 1
                }
                if hasDataFile {
                    log("ERROR compressed cluster \(i) with data file, entry=0x\(Self.hex(entry))")
                    res.corruptions += 1
                    continue
                }
                if bitmap != 0 {
                    log("ERROR compressed cluster \(i) with non-zero subcluster allocation bitmap, entry=0x\(Self.hex(entry))")
                    res.corruptions += 1
                    continue
                }
                let (coffset, csize) = compressedRange(entry)
                countReference(&res, &table, offset: coffset, size: csize)
                if active {
                    res.allocatedClusters += 1
                    res.compressedClusters += 1
                    // Compressed clusters share sectors: always counted as fragmented.
                    res.fragmentedClusters += 1
                }

            case .normal, .zeroAllocated:
                let offset = entry & Self.l2OffsetMask
                if (bitmap >> 32) & bitmap != 0 {
                    res.corruptions += 1
                    log("ERROR offset=\(Self.hex(offset)): Allocated cluster has corrupted subcluster allocation bitmap")
                }
                if offsetInCluster(offset) != 0 {
                    res.corruptions += 1
                    let containsData = extendedL2 ? bitmap & Self.allAllocBits != 0 : entry & Self.zero == 0
                    if !containsData {
                        log("\(repair.contains(.errors) ? "Repairing" : "ERROR") offset=\(Self.hex(offset)): Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        if repair.contains(.errors) {
                            switch zeroEntry(&res, l2: &l2, l2Offset: l2Offset, index: i, active: active) {
                            case .fixed: continue
                            case .overlap: throw CheckStop.io
                            case .failed: break
                            }
                        }
                    } else {
                        log("ERROR offset=\(Self.hex(offset)): Data cluster is not properly aligned; L2 entry corrupted.")
                    }
                }
                if active {
                    res.allocatedClusters += 1
                    if nextContiguous != 0 && offset != nextContiguous { res.fragmentedClusters += 1 }
                    nextContiguous = offset &+ clusterSize
                }
                if !hasDataFile {
                    countReference(&res, &table, offset: offset, size: clusterSize)
                }

            case .zeroPlain:
                break

            case .unallocated:
                if bitmap & Self.allAllocBits != 0 {
                    res.corruptions += 1
                    log("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                }
            }
        }
    }

    enum EntryFix { case fixed, failed, overlap }

    /// QEMU's `fix_l2_entry_by_zero`: the entry becomes a plain zero cluster (with extended
    /// L2: unallocated, its allocated subclusters zero). The caller counted the corruption.
    func zeroEntry(_ res: inout CheckResult, l2: inout [UInt8], l2Offset: UInt64, index: Int, active: Bool) -> EntryFix {
        let at = index * l2EntrySize
        if extendedL2 {
            var bitmap = l2.withUnsafeBytes { loadBE64($0, at + 8) }
            bitmap |= bitmap << 32
            bitmap &= Self.allZeroBits
            l2.putBE(UInt64(0), at: at)
            l2.putBE(bitmap, at: at + 8)
        } else {
            l2.putBE(Self.zero, at: at)
        }
        let entryOffset = l2Offset + UInt64(at)
        if let hit = overlapCheck(ignoring: active ? .activeL2 : .inactiveL2, offset: entryOffset, size: UInt64(l2EntrySize)) {
            reportOverlap(hit)
            log("ERROR: Overlap check failed")
            res.checkErrors += 1
            return .overlap
        }
        do {
            try file.write(Array(l2[at..<(at + l2EntrySize)]), at: entryOffset)
            try file.sync()
        } catch {
            log("ERROR: Failed to overwrite L2 table entry: \(CheckStop.from(error).reason)")
            res.checkErrors += 1
            return .failed
        }
        res.corruptions -= 1
        res.corruptionsFixed += 1
        return .fixed
    }

    /// QEMU's `check_refblocks`: every refcount block must be aligned, inside the file and
    /// referenced exactly once.
    func checkRefcountBlocks(_ res: inout CheckResult, _ table: inout ReferenceTable, repair: CheckRepair,
                             rebuild: inout Bool) throws(CheckStop) {
        for (i, raw) in reftable.enumerated() {
            let offset = raw & Self.reftableOffsetMask
            let cluster = offset >> clusterBits
            if raw & Self.reftableReservedMask != 0 {
                log("ERROR refcount table entry \(i) has reserved bits set")
                res.corruptions += 1
                rebuild = true
                continue
            }
            if offsetInCluster(offset) != 0 {
                log("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                res.corruptions += 1
                rebuild = true
                continue
            }
            if cluster >= table.count {
                res.corruptions += 1
                log("\(repair.contains(.errors) ? "Repairing" : "ERROR") refcount block \(i) is outside image")
                // QEMU grows the file to cover the block; a rebuild fixes this without
                // extending the file to an offset taken from the image.
                if repair.contains(.errors) {
                    rebuild = true
                    // QEMU tries to grow the file up to the block, which fails this way for
                    // an offset at the end of the 63-bit range.
                    if offset > UInt64(Int64.max) - clusterSize {
                        log("ERROR could not resize image: \(CheckStop.invalid.reason)")
                    }
                }
                continue
            }
            if offset != 0 {
                countReference(&res, &table, offset: offset, size: clusterSize)
                let v = table[cluster]
                if v != 1 {
                    log("ERROR refcount block \(i) refcount=\(v)")
                    res.corruptions += 1
                    rebuild = true
                }
            }
        }
    }

    /// QEMU's `qcow2_check_bitmaps_refcounts`: the bitmap directory, each bitmap table and
    /// the data clusters the tables point to (only when the autoclear bit says the bitmaps
    /// are maintained; otherwise QEMU ignores the extension).
    func countBitmaps(_ res: inout CheckResult, _ table: inout ReferenceTable) throws(CheckStop) {
        guard header.autoclearFeatures.contains(.bitmaps), let b = image.bitmaps, b.count > 0 else { return }
        countReference(&res, &table, offset: b.directoryOffset, size: b.directorySize)
        guard let list = loadBitmapDirectory(b) else {
            res.corruptions += 1
            throw CheckStop.invalid
        }
        for bm in list {
            countReference(&res, &table, offset: bm.tableOffset, size: UInt64(bm.tableSize) * 8)
            let entries: [UInt64]
            do { entries = try readTable(offset: bm.tableOffset, entries: UInt64(bm.tableSize)) } catch {
                res.corruptions += 1
                throw CheckStop.from(error)
            }
            for e in entries {
                let offset = e & 0x00FF_FFFF_FFFF_FE00
                // check_table_entry: reserved bits, or "all ones" / unaligned with an offset.
                if e & 0xFF00_0000_0000_01FE != 0 || (offset != 0 && (e & 1 != 0 || offsetInCluster(offset) != 0)) {
                    res.corruptions += 1
                    continue
                }
                if offset == 0 { continue }
                countReference(&res, &table, offset: offset, size: clusterSize)
            }
        }
    }

    struct BitmapTableRef { var tableOffset: UInt64; var tableSize: UInt32 }

    /// Parses the bitmap directory with QEMU's per-entry checks; nil when it is invalid.
    func loadBitmapDirectory(_ b: BitmapsExtension) -> [BitmapTableRef]? {
        guard b.directorySize <= 64 * 1024 * 1024, b.directorySize > 0, offsetInCluster(b.directoryOffset) == 0,
              b.directoryOffset < fileSize,
              let dir = try? file.read(count: Int(b.directorySize), at: b.directoryOffset) else { return nil }
        let r = ByteReader(dir, structure: "bitmap directory")
        var out: [BitmapTableRef] = []
        var pos = 0
        for _ in 0..<b.count {
            guard let tableOffset = try? r.u64(pos), let tableSize = try? r.u32(pos + 8),
                  let type = try? r.u8(pos + 16), let granularity = try? r.u8(pos + 17), let nameSize = try? r.u16(pos + 18),
                  let extra = try? r.u32(pos + 20) else { return nil }
            let entrySize = (24 + Int(extra) + Int(nameSize) + 7) & ~7
            guard type == 1, granularity >= 9, granularity <= 31, nameSize > 0,
                  offsetInCluster(tableOffset) == 0, tableSize <= 0x800_0000,
                  pos + entrySize <= dir.count else { return nil }
            out.append(BitmapTableRef(tableOffset: tableOffset, tableSize: tableSize))
            pos += entrySize
        }
        return out
    }
}
