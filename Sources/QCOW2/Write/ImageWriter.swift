import QCOW2Format

/// The write side of the top qcow2 layer: guest writes, zero writes, discards, flushes.
///
/// Metadata follows QEMU's crash-safe order (format doc §14.5) with write-back L2/L1:
/// - refcount increases are written at once (write-through), data is written at once;
/// - changed L2 tables stay in memory (visible to reads through the layer's `dirtyL2`)
///   and changed L1 entries are remembered;
/// - `flush` syncs (data and refcounts durable), writes the L2 tables, syncs, writes the L1
///   entries, syncs, and only then applies the refcount decreases of clusters that were
///   unlinked — so a crash at any point leaves leaks at worst, never a reference to a
///   cluster with a too-low refcount.
/// All metadata work is serialized by one lock.
final class ImageWriter: @unchecked Sendable {
    let layer: QCOW2Layer
    let file: FileHandle
    let dataFile: FileHandle?
    let l2Cache: L2SliceCache
    /// Reads the current guest view (through the chain) for copy-on-write.
    let readGuest: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void
    /// Drops chain-index resolutions of a guest range after its mapping changed.
    let invalidate: (UInt64, UInt64) -> Void
    /// True when the allocation map says the whole range reads as zeros.
    let statusZero: (UInt64, UInt64) throws -> Bool
    let hasBacking: Bool

    private let lock = Lock()
    /// In-place data writes running outside `lock`; drained before anything that could
    /// free or share their clusters (flush's frees, snapshots, resize).
    private let inFlight = InFlightCounter()
    /// Guest clusters (indices) whose allocating write is filling new host clusters
    /// outside `lock`. Anything else that would change their mapping waits for them
    /// (QEMU's dependencies between overlapping allocations); whole-image operations wait
    /// until none is left.
    private var busyClusters: Set<UInt64> = []
    private var image: ImageHeader
    private var refcounts: RefcountManager
    private var dirtyL1: Set<Int> = []
    private var dirtyTables: Set<UInt64> = []
    private var l2Tables: Set<UInt64> = []
    /// (host offset, length, punch hole when freed)
    private var pendingFrees: [(UInt64, UInt64, Bool)] = []
    private var setDirtyBit = false
    private(set) var isReadOnly = false

    private var g: ClusterGeometry { layer.geometry }
    var cs: UInt64 { layer.geometry.clusterSize }
    private var virtualSize: UInt64 { layer.virtualSize }
    /// Budget of L2 tables held dirty before an automatic flush.
    private let dirtyBudget = 16 << 20

    init(layer: QCOW2Layer, file: FileHandle, dataFile: FileHandle?, l2Cache: L2SliceCache, hasBacking: Bool,
         readGuest: @escaping (UInt64, UnsafeMutableRawBufferPointer) throws -> Void,
         invalidate: @escaping (UInt64, UInt64) -> Void,
         statusZero: @escaping (UInt64, UInt64) throws -> Bool) throws {
        self.layer = layer
        self.file = file
        self.dataFile = dataFile
        self.l2Cache = l2Cache
        self.readGuest = readGuest
        self.invalidate = invalidate
        self.statusZero = statusZero
        self.hasBacking = hasBacking
        var image = layer.image
        let wasDirty = image.header.incompatibleFeatures.contains(.dirty)
        if wasDirty {
            // Refcounts may be stale (lazy refcounts and no clean close): rebuild them from
            // the metadata before allocating anything, then clear the bit, as QEMU does.
            try RefcountRebuild.rebuild(file: file, image: &image)
            image.header.incompatibleFeatures.remove(.dirty)
            var b: [UInt8] = []
            b.appendBE(image.header.incompatibleFeatures.rawValue)
            try file.write(b, at: 72)
            try file.sync()
            layer.fileEnd.store(try file.size(), ordering: .relaxed)
        }
        self.image = image
        let h = image.header
        refcounts = try Self.refcountManager(file: file, header: h)
        for e in layer.l1.withLock({ $0 }) where L1Entry(rawValue: e).l2Offset != 0 {
            l2Tables.insert(L1Entry(rawValue: e).l2Offset)
        }
        // Unknown autoclear bits, and the bitmaps bit (bitmaps are not maintained), are
        // cleared before the first modification, as QEMU does.
        let keep = AutoclearFeatures.dataFileRaw
        if image.header.autoclearFeatures.rawValue & ~keep.rawValue != 0 {
            image.header.autoclearFeatures = AutoclearFeatures(rawValue: image.header.autoclearFeatures.rawValue & keep.rawValue)
            try writeHeaderField(at: 88, image.header.autoclearFeatures.rawValue)
            try syncWithRefcounts()
        }
        if wasDirty && dataFile == nil { try recomputeActiveCopiedFlags() }
    }

    private static func refcountManager(file: FileHandle, header: QCOW2Header) throws -> RefcountManager {
        try RefcountManager(file: file, header: header) { offset, clusters in
            var pair: [UInt8] = []
            pair.appendBE(offset)
            pair.appendBE(clusters)
            try file.write(pair, at: 48)
        }
    }

    private func makeRefcountManager(_ header: QCOW2Header) throws -> RefcountManager {
        try Self.refcountManager(file: file, header: header)
    }

    /// A write barrier: changed refcount blocks are written, then everything is synced.
    /// Every sync of the writer goes through here, so a reference written after a sync
    /// never precedes its refcount on disk.
    func syncWithRefcounts() throws {
        try refcounts.writeDirtyBlocks()
        if durable { try file.sync() }
    }

    /// False for `cache=unsafe` (see `OpenOptions.durableFlush`).
    var durable = true

    private func writeHeaderField(at offset: UInt64, _ value: UInt64) throws {
        var b: [UInt8] = []
        b.appendBE(value)
        try file.write(b, at: offset)
    }

    private func ensureWritable() throws {
        guard !isReadOnly else {
            throw QCOW2Error.corrupt(path: layer.path, "image was marked corrupt and is now read-only")
        }
        if image.header.compatibleFeatures.contains(.lazyRefcounts) && !setDirtyBit && image.header.version >= 3 {
            // Lazy refcounts: mark the image dirty before the first change (cleared on close).
            image.header.incompatibleFeatures.insert(.dirty)
            try writeHeaderField(at: 72, image.header.incompatibleFeatures.rawValue)
            try syncWithRefcounts()
            setDirtyBit = true
        }
    }

    // MARK: L2 tables

    /// The L2 table for L1 index `l1i`, allocated or copied so that it may be modified.
    private func writableTable(_ l1i: Int) throws -> UInt64 {
        let e = L1Entry(rawValue: layer.l1.withLock { l1i < $0.count ? $0[l1i] : 0 })
        if e.l2Offset != 0 && e.isCopied {
            try loadTable(e.l2Offset)
            return e.l2Offset
        }
        let newOffset = try refcounts.allocate(clusters: 1)
        var table = [UInt8](repeating: 0, count: Int(cs))
        if e.l2Offset != 0 {
            // Shared L2 (refcount > 1): copy it; the data refcounts do not change.
            try loadTable(e.l2Offset)
            table = layer.dirtyL2.withLock { $0[e.l2Offset]! }
            pendingFrees.append((e.l2Offset, cs, false))
        }
        layer.dirtyL2.withLock { $0[newOffset] = table }
        dirtyTables.insert(newOffset)
        l2Tables.insert(newOffset)
        // The file end must cover the table before the L1 entry publishes it: a concurrent
        // reader that sees the new entry checks the offset against the file end.
        bumpFileEnd(newOffset + cs)
        layer.l1.withLock { $0[l1i] = L1Entry(l2Offset: newOffset, copied: true).rawValue }
        dirtyL1.insert(l1i)
        return newOffset
    }

    private func loadTable(_ offset: UInt64) throws {
        if layer.dirtyL2.withLock({ $0[offset] != nil }) { return }
        let bytes = try file.read(count: Int(cs), at: offset)
        layer.dirtyL2.withLock { $0[offset] = bytes }
    }

    private func entry(_ table: UInt64, _ index: Int) -> L2Entry {
        layer.dirtyL2.withLock { d in
            d[table]!.withUnsafeBytes { raw in
                g.extendedL2
                    ? L2Entry(rawValue: loadBE64(raw, index * 16), bitmap: loadBE64(raw, index * 16 + 8))
                    : L2Entry(rawValue: loadBE64(raw, index * 8))
            }
        }
    }

    private func setEntry(_ table: UInt64, _ index: Int, _ e: L2Entry) {
        let ext = g.extendedL2
        layer.dirtyL2.withLock { d in
            d[table]!.withUnsafeMutableBytes { raw in
                if ext {
                    raw.storeBytes(of: e.rawValue.bigEndian, toByteOffset: index * 16, as: UInt64.self)
                    raw.storeBytes(of: e.bitmap.bigEndian, toByteOffset: index * 16 + 8, as: UInt64.self)
                } else {
                    raw.storeBytes(of: e.rawValue.bigEndian, toByteOffset: index * 8, as: UInt64.self)
                }
            }
        }
        dirtyTables.insert(table)
    }

    private func bumpFileEnd(_ end: UInt64) {
        var current = layer.fileEnd.load(ordering: .relaxed)
        while end > current {
            let (exchanged, original) = layer.fileEnd.compareExchange(expected: current, desired: end, ordering: .relaxed)
            if exchanged { break }
            current = original
        }
    }

    private func kind(of e: L2Entry, at guest: UInt64) throws -> ClusterKind {
        do {
            return try e.clusterKind(geometry: g, version: image.header.version, externalData: image.header.hasExternalDataFile)
        } catch {
            throw QCOW2Error.corrupt(path: layer.path, "guest offset 0x\(String(guest, radix: 16)): \(error)")
        }
    }

    /// Queues the release of the host clusters an entry owned (applied after the next
    /// metadata sync, so the unlink is durable first).
    private func releaseOld(_ kind: ClusterKind, punch: Bool) {
        switch kind {
        case let .normal(h), let .zeroAllocated(h):
            if dataFile == nil { pendingFrees.append((h, cs, punch)) }
        case let .compressed(d):
            pendingFrees.append((d.hostOffset, d.compressedSize, punch))
        case .unallocated, .zeroPlain:
            break
        }
    }

    // MARK: Overlap check

    /// True when host cluster `c` holds metadata (QEMU's overlap check before data writes).
    private func isMetadata(_ host: UInt64) -> Bool {
        let h = image.header
        if host < cs { return true }
        func inside(_ start: UInt64, _ bytes: UInt64) -> Bool { bytes > 0 && host + cs > start && host < start + bytes }
        if inside(h.l1TableOffset, UInt64(h.l1Size) * 8) { return true }
        if inside(refcounts.tableOffset, UInt64(refcounts.tableClusters) * cs) { return true }
        if refcounts.blockOffsets.contains(host) { return true }
        if l2Tables.contains(host) { return true }
        if h.nbSnapshots > 0 && host == h.snapshotsOffset { return true }
        return false
    }

    private func markCorrupt(_ reason: String) throws -> Never {
        isReadOnly = true
        if image.header.version >= 3 {
            image.header.incompatibleFeatures.insert(.corrupt)
            try? writeHeaderField(at: 72, image.header.incompatibleFeatures.rawValue)
            try? file.sync()
        }
        throw QCOW2Error.corrupt(path: layer.path, "Marking image as corrupt: \(reason); further corruption events will be suppressed")
    }

    /// How the layer's data is encrypted (nil: plain).
    var encryption: LayerEncryption? { layer.encryption }

    /// The one place guest data reaches the file: encrypted here for encrypted layers
    /// (LUKS: sector numbers from the host offset), so copy-on-write fill, zero buffers
    /// and in-place writes are all ciphertext.
    private func writeData(_ data: UnsafeRawBufferPointer, at host: UInt64) throws {
        if let encryption {
            let buffer = try encryption.encrypted(data, host: host)
            defer { buffer.deallocate() }
            return try writePlainData(UnsafeRawBufferPointer(buffer), at: host)
        }
        try writePlainData(data, at: host)
    }

    private func writePlainData(_ data: UnsafeRawBufferPointer, at host: UInt64) throws {
        if let dataFile {
            try dataFile.write(data, at: host)
        } else {
            try file.write(data, at: host)
            bumpFileEnd(host + UInt64(data.count))
        }
    }

    // MARK: Guest writes

    func write(at offset: UInt64, _ data: UnsafeRawBufferPointer) throws {
        // Fast path: the whole request lies in one cluster this layer owns. Look it up under
        // the lock, write the data outside it (data I/O is not serialized).
        if let host = try lock.withLock({ () throws -> UInt64? in
            guard let host = try ownedHost(for: offset, count: UInt64(data.count)) else { return nil }
            inFlight.enter()
            return host
        }) {
            defer { inFlight.leave() }
            try writeData(data, at: host)
            return
        }
        let end = offset + UInt64(data.count)
        var pos = offset
        var hostHint: UInt64?
        while pos < end {
            let rest = UnsafeRawBufferPointer(rebasing: data[Int(pos - offset)...])
            // Under the lock: write in place, or allocate new clusters and mark them busy.
            let step: RunStep = try lock.withLock {
                try ensureWritable()
                waitForClusters(pos, end)
                if g.extendedL2 {
                    let clusterStart = pos & ~(cs - 1)
                    let n = min(end, clusterStart + cs) - pos
                    try writeCluster(clusterStart, inCluster: pos - clusterStart, UnsafeRawBufferPointer(rebasing: rest[0..<Int(n)]))
                    invalidate(pos, pos + n)
                    try flushIfOverBudget()
                    return .done(n)
                }
                return try planRun(at: pos, rest, hostHint: &hostHint)
            }
            switch step {
            case let .done(n):
                pos += n
            case let .allocated(run):
                // Outside the lock: copy-on-write reads and the data write, in parallel
                // with other requests. Then link the new clusters under the lock.
                do {
                    try fill(run, rest)
                } catch {
                    lock.withLock {
                        // Nothing points at the new clusters yet: give them back.
                        if dataFile == nil { try? refcounts.release(offset: run.hostStart, length: run.count * cs) }
                        finish(run)
                    }
                    throw error
                }
                try lock.withLock {
                    defer { finish(run) }
                    try link(run)
                    invalidate(pos, pos + run.written)
                    try flushIfOverBudget()
                }
                pos += run.written
            }
        }
    }

    /// What the locked part of a guest write did.
    private enum RunStep {
        /// Written (in place, or with extended L2 entirely under the lock): byte count.
        case done(UInt64)
        /// New clusters allocated and marked busy: fill them, then `link`.
        case allocated(AllocatedRun)
    }

    /// A run of new host clusters for guest clusters `clusterStart...`, being filled.
    private struct AllocatedRun {
        var offset: UInt64  // guest offset of the request's first byte in the run
        var clusterStart: UInt64
        var count: UInt64
        var hostStart: UInt64
        var written: UInt64
        /// Whether the head / tail copy-on-write may read non-zero data.
        var headReads: Bool
        var tailReads: Bool
    }

    /// Waits (releasing the lock) until no allocating write is filling a cluster of
    /// `[start, end)`.
    private func waitForClusters(_ start: UInt64, _ end: UInt64) {
        guard end > start else { return }
        let first = start / cs, last = (end - 1) / cs
        while busyClusters.contains(where: { $0 >= first && $0 <= last }) { lock.wait() }
    }

    /// Waits (releasing the lock) until no allocating write is in progress.
    private func drainAllocations() {
        while !busyClusters.isEmpty { lock.wait() }
    }

    private func finish(_ run: AllocatedRun) {
        let first = run.clusterStart / cs
        for c in first..<(first + run.count) { busyClusters.remove(c) }
        lock.broadcast()
    }

    /// The host offset for an in-place write of `[offset, offset+count)` when it lies in
    /// one standard cluster that this layer owns (copied flag set), else nil.
    private func ownedHost(for offset: UInt64, count: UInt64) throws -> UInt64? {
        guard !isReadOnly, !g.extendedL2, count > 0, !setDirtyBitPending else { return nil }
        let clusterStart = offset & ~(cs - 1)
        guard offset + count <= clusterStart + cs else { return nil }
        let l1i = Int(g.l1Index(clusterStart))
        let l1e = L1Entry(rawValue: layer.l1.withLock { l1i < $0.count ? $0[l1i] : 0 })
        guard l1e.l2Offset != 0, l1e.isCopied else { return nil }
        try loadTable(l1e.l2Offset)
        let e = entry(l1e.l2Offset, Int(g.l2Index(clusterStart)))
        guard case let .normal(host) = try kind(of: e, at: clusterStart), e.isCopied || dataFile != nil else { return nil }
        if dataFile == nil && isMetadata(host) { return nil }  // the slow path marks the image corrupt
        return host + (offset - clusterStart)
    }

    /// True until lazy refcounts have set the dirty bit (the slow path does that first).
    private var setDirtyBitPending: Bool {
        image.header.compatibleFeatures.contains(.lazyRefcounts) && !setDirtyBit && image.header.version >= 3
    }

    /// Standard L2 entries: plans the write of as much of `data` (starting at guest
    /// `offset`) as one L2 slice allows, the way QEMU's `qcow2_alloc_host_offset` does: in
    /// place over a cluster this layer owns (done here), or into one contiguous run of new
    /// clusters (continuing after the previous run when possible), which the caller fills
    /// outside the lock (`fill`) and then links (`link`).
    private func planRun(at offset: UInt64, _ data: UnsafeRawBufferPointer, hostHint: inout UInt64?) throws -> RunStep {
        let clusterStart = offset & ~(cs - 1)
        let inCluster = offset - clusterStart
        let table = try writableTable(Int(g.l1Index(clusterStart)))
        let index = Int(g.l2Index(clusterStart))
        let sliceEntries = Int(layer.sliceEntries)
        let sliceLeft = (index / sliceEntries + 1) * sliceEntries - index
        let requestClusters = Int((inCluster + UInt64(data.count) + cs - 1) / cs)
        let maxClusters = min(sliceLeft, requestClusters)
        let first = entry(table, index)
        let firstKind = try kind(of: first, at: clusterStart)
        if case let .normal(host) = firstKind, first.isCopied || dataFile != nil {
            if dataFile == nil && isMetadata(host) {
                try markCorrupt("preventing a data write to host offset 0x\(String(host, radix: 16)), which holds metadata")
            }
            let n = min(UInt64(data.count), cs - inCluster)
            try writeData(UnsafeRawBufferPointer(rebasing: data[0..<Int(n)]), at: host + inCluster)
            hostHint = nil
            invalidate(offset, offset + n)
            return .done(n)
        }
        // Clusters that need a new allocation, contiguous in guest space.
        var kinds = [firstKind]
        while kinds.count < maxClusters {
            let e = entry(table, index + kinds.count)
            let k = try kind(of: e, at: clusterStart + UInt64(kinds.count) * cs)
            if case .normal = k, e.isCopied || dataFile != nil { break }
            kinds.append(k)
        }
        var count = UInt64(kinds.count)
        let hostStart: UInt64
        if dataFile != nil {
            hostStart = clusterStart  // external data files map guest offsets 1:1
        } else if let hint = hostHint, let got = try refcounts.allocateAt(hint / cs, count: count), got > 0 {
            hostStart = hint
            count = got
        } else {
            hostStart = try refcounts.allocate(clusters: count)
        }
        // Copy-on-write reads are needed only where the old cluster (or the backing file)
        // can hold non-zero data.
        func readsZero(_ k: ClusterKind) -> Bool {
            switch k {
            case .zeroPlain, .zeroAllocated: return true
            case .unallocated: return !hasBacking
            default: return false
            }
        }
        let runEnd = min(clusterStart + count * cs, virtualSize)
        let run = AllocatedRun(offset: offset, clusterStart: clusterStart, count: count, hostStart: hostStart,
                               written: min(UInt64(data.count), runEnd - offset),
                               headReads: !readsZero(kinds[0]), tailReads: !readsZero(kinds[Int(count) - 1]))
        hostHint = dataFile == nil ? hostStart + count * cs : nil
        let firstIndex = clusterStart / cs
        for c in firstIndex..<(firstIndex + count) { busyClusters.insert(c) }
        return .allocated(run)
    }

    /// `planRun`, `fill` and `link` in one go, for callers that hold the lock throughout.
    private func writeRunLocked(at offset: UInt64, _ data: UnsafeRawBufferPointer, hostHint: inout UInt64?) throws -> UInt64 {
        switch try planRun(at: offset, data, hostHint: &hostHint) {
        case let .done(n):
            return n
        case let .allocated(run):
            defer { finish(run) }
            try fill(run, data)
            try link(run)
            return run.written
        }
    }

    /// Fills a run's new clusters (no lock held): the request's bytes, with the guest's
    /// current content copied in around them (copy-on-write).
    private func fill(_ run: AllocatedRun, _ data: UnsafeRawBufferPointer) throws {
        let runEnd = min(run.clusterStart + run.count * cs, virtualSize)
        let headCOW = run.offset - run.clusterStart
        let tailFrom = run.offset + run.written
        if headCOW == 0 && tailFrom == runEnd {
            return try writeData(UnsafeRawBufferPointer(rebasing: data[0..<Int(run.written)]), at: run.hostStart)
        }
        let length = Int(runEnd - run.clusterStart)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 4096)
        defer { buffer.deallocate() }
        if headCOW > 0 {
            let head = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(headCOW)])
            if run.headReads { try readGuest(run.clusterStart, head) } else { head.initializeMemory(as: UInt8.self, repeating: 0) }
        }
        if tailFrom < runEnd {
            let tail = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(tailFrom - run.clusterStart)..<length])
            if run.tailReads { try readGuest(tailFrom, tail) } else { tail.initializeMemory(as: UInt8.self, repeating: 0) }
        }
        UnsafeMutableRawBufferPointer(rebasing: buffer[Int(headCOW)..<Int(headCOW + run.written)])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[0..<Int(run.written)]))
        try writeData(UnsafeRawBufferPointer(buffer), at: run.hostStart)
    }

    /// Points the run's guest clusters at their filled new clusters and releases what they
    /// pointed at. The table is looked up again: another write may have copied it meanwhile.
    private func link(_ run: AllocatedRun) throws {
        let table = try writableTable(Int(g.l1Index(run.clusterStart)))
        let index = Int(g.l2Index(run.clusterStart))
        for i in 0..<Int(run.count) {
            let host = run.hostStart + UInt64(i) * cs
            let old = try kind(of: entry(table, index + i), at: run.clusterStart + UInt64(i) * cs)
            setEntry(table, index + i, L2Entry(rawValue: host | L2Entry.copiedFlag))
            if case let .normal(h) = old, h == host { continue }
            releaseOld(old, punch: false)
        }
    }

    private func writeCluster(_ clusterStart: UInt64, inCluster: UInt64, _ data: UnsafeRawBufferPointer) throws {
        let table = try writableTable(Int(g.l1Index(clusterStart)))
        let index = Int(g.l2Index(clusterStart))
        let old = entry(table, index)
        let oldKind = try kind(of: old, at: clusterStart)
        if g.extendedL2 {
            return try writeSubclusters(clusterStart, inCluster: inCluster, data, table: table, index: index, old: old, oldKind: oldKind)
        }
        if case let .normal(host) = oldKind, old.isCopied || dataFile != nil {
            if dataFile == nil && isMetadata(host) {
                try markCorrupt("preventing a data write to host offset 0x\(String(host, radix: 16)), which holds metadata")
            }
            return try writeData(data, at: host + inCluster)
        }
        // Allocate a new cluster and fill it: the current guest view (backing data, zeros,
        // or the old cluster) with the new bytes on top.
        let valid = min(cs, virtualSize - clusterStart)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let full = inCluster == 0 && UInt64(data.count) >= valid
        if !full { try readGuest(clusterStart, UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(valid)])) }
        UnsafeMutableRawBufferPointer(rebasing: buffer[Int(inCluster)..<(Int(inCluster) + data.count)]).copyMemory(from: data)
        let host: UInt64
        if dataFile != nil {
            host = clusterStart  // external data files map guest offsets 1:1
        } else {
            host = try refcounts.allocate(clusters: 1)
        }
        try writeData(UnsafeRawBufferPointer(rebasing: buffer[0..<Int(valid)]), at: host)
        setEntry(table, index, L2Entry(rawValue: host | L2Entry.copiedFlag))
        if case let .normal(h) = oldKind, h == host { return }
        releaseOld(oldKind, punch: false)
    }

    /// Extended L2: allocation and copy-on-write per subcluster.
    private func writeSubclusters(_ clusterStart: UInt64, inCluster: UInt64, _ data: UnsafeRawBufferPointer,
                                  table: UInt64, index: Int, old: L2Entry, oldKind: ClusterKind) throws {
        let sc = g.subclusterSize
        let first = Int(inCluster / sc), last = Int((inCluster + UInt64(data.count) - 1) / sc)
        var alloc = UInt32(truncatingIfNeeded: old.bitmap)
        var zero = UInt32(truncatingIfNeeded: old.bitmap >> 32)
        var host: UInt64
        var materialize = UInt32(0)
        var reused = false
        switch oldKind {
        case let .normal(h) where old.isCopied || dataFile != nil, let .zeroAllocated(h) where old.isCopied || dataFile != nil:
            if alloc & zero != 0 { throw QCOW2Error.corrupt(path: layer.path, "invalid subcluster bitmap at guest offset 0x\(String(clusterStart, radix: 16))") }
            host = h
            reused = true
            if dataFile == nil && isMetadata(host) {
                try markCorrupt("preventing a data write to host offset 0x\(String(host, radix: 16)), which holds metadata")
            }
        default:
            host = dataFile != nil ? clusterStart : try refcounts.allocate(clusters: 1)
            switch oldKind {
            case .compressed: materialize = UInt32.max  // every subcluster came from the stream
            case .normal: materialize = alloc  // shared cluster: copy its allocated subclusters
            default: break
            }
            if case .compressed = oldKind { zero = 0 }
            if case .unallocated = oldKind, alloc != 0 { throw QCOW2Error.corrupt(path: layer.path, "invalid subcluster bitmap at guest offset 0x\(String(clusterStart, radix: 16))") }
            alloc = 0
        }
        let valid = min(cs, virtualSize - clusterStart)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 4096)
        defer { buffer.deallocate() }
        for i in 0..<32 {
            let touched = i >= first && i <= last
            guard touched || materialize & (1 << UInt32(i)) != 0 else { continue }
            let subStart = UInt64(i) * sc
            guard subStart < valid else { break }
            let subLen = min(sc, valid - subStart)
            let sub = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(subStart)..<Int(subStart + subLen)])
            let writeFrom = max(subStart, inCluster), writeTo = min(subStart + subLen, inCluster + UInt64(data.count))
            let covers = touched && writeFrom == subStart && writeTo == subStart + subLen
            if !covers {
                if reused && alloc & (1 << UInt32(i)) != 0 {
                    // Already allocated in this cluster: write just the new bytes in place.
                    if touched {
                        let part = UnsafeRawBufferPointer(rebasing: data[Int(writeFrom - inCluster)..<Int(writeTo - inCluster)])
                        try writeData(part, at: host + writeFrom)
                    }
                    continue
                }
                try readGuest(clusterStart + subStart, sub)
            }
            if touched {
                UnsafeMutableRawBufferPointer(rebasing: buffer[Int(writeFrom)..<Int(writeTo)])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[Int(writeFrom - inCluster)..<Int(writeTo - inCluster)]))
            }
            try writeData(UnsafeRawBufferPointer(sub), at: host + subStart)
            alloc |= 1 << UInt32(i)
            zero &= ~(1 << UInt32(i))
        }
        let newEntry = L2Entry(rawValue: host | L2Entry.copiedFlag, bitmap: UInt64(zero) << 32 | UInt64(alloc))
        if newEntry != old { setEntry(table, index, newEntry) }
        if !reused { releaseOld(oldKind, punch: false) }
    }

    // MARK: Zeroes and discard

    /// Makes `[offset, offset+length)` read as zeros, following QEMU's
    /// `bdrv_co_do_pwrite_zeroes` + `qcow2_co_pwrite_zeroes` + `qcow2_subcluster_zeroize`:
    /// the request is split at subcluster boundaries; an unaligned head or tail becomes a
    /// whole zero (sub)cluster when the rest of it already reads as zeros, otherwise zeros
    /// are written; aligned parts get the zero flag (v3) or zero bits (extended L2), or are
    /// discarded (v2 without a backing file). With `unmap`, host clusters are released.
    func writeZeroes(at offset: UInt64, length: UInt64, unmap: Bool) throws {
        try lock.withLock {
            try ensureWritable()
            let end = offset + length
            waitForClusters(offset, end)
            let sc = g.subclusterSize
            let alignedStart = min(end, (offset + sc - 1) / sc * sc)
            let alignedEnd = end == virtualSize ? end : max(alignedStart, end / sc * sc)
            if offset < alignedStart { try zeroUnaligned(offset, alignedStart, unmap: unmap) }
            if alignedStart < alignedEnd {
                if try !zeroize(alignedStart, alignedEnd, unmap: unmap) {
                    try writeZeroBuffer(alignedStart, alignedEnd)
                }
            }
            if alignedEnd < end { try zeroUnaligned(alignedEnd, end, unmap: unmap) }
            invalidate(offset, end)
            try flushIfOverBudget()
        }
    }

    /// A piece inside one subcluster: QEMU's head/tail handling in `qcow2_co_pwrite_zeroes`.
    private func zeroUnaligned(_ from: UInt64, _ to: UInt64, unmap: Bool) throws {
        let sc = g.subclusterSize
        let subStart = from / sc * sc
        let subEnd = min(subStart + sc, virtualSize)
        if try readsAsZero(subStart, from) && readsAsZero(to, subEnd), try subclusterIsUnallocatedOrZero(subStart),
           try zeroize(subStart, subEnd, unmap: unmap) {
            return
        }
        try writeZeroBuffer(from, to)
    }

    /// QEMU's `is_zero`: the block status (not the bytes) says the range reads as zeros.
    private func readsAsZero(_ from: UInt64, _ to: UInt64) throws -> Bool {
        guard to > from else { return true }
        return try statusZero(from, to)
    }

    private func subclusterIsUnallocatedOrZero(_ guest: UInt64) throws -> Bool {
        let l1i = Int(g.l1Index(guest))
        let l1e = L1Entry(rawValue: layer.l1.withLock { l1i < $0.count ? $0[l1i] : 0 })
        guard l1e.l2Offset != 0 else { return true }
        try loadTable(l1e.l2Offset)
        let e = entry(l1e.l2Offset, Int(g.l2Index(guest)))
        let k = try kind(of: e, at: guest)
        if g.extendedL2 {
            switch e.subclusterType(Int((guest % cs) / g.subclusterSize), kind: k) {
            case .unallocatedPlain, .unallocatedAllocated, .zeroPlain, .zeroAllocated: return true
            default: return false
            }
        }
        switch k {
        case .unallocated, .zeroPlain, .zeroAllocated: return true
        default: return false
        }
    }

    private func writeZeroBuffer(_ from: UInt64, _ to: UInt64) throws {
        var pos = from
        let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(to - from, 4 << 20)), alignment: 4096)
        defer { chunk.deallocate() }
        chunk.initializeMemory(as: UInt8.self, repeating: 0)
        var hint: UInt64?
        while pos < to {
            let n = min(UInt64(chunk.count), to - pos)
            var done: UInt64 = 0
            while done < n {
                let part = UnsafeRawBufferPointer(rebasing: chunk[Int(done)..<Int(n)])
                if g.extendedL2 {
                    let clusterStart = (pos + done) & ~(cs - 1)
                    let m = min(UInt64(part.count), clusterStart + cs - (pos + done))
                    try writeCluster(clusterStart, inCluster: pos + done - clusterStart, UnsafeRawBufferPointer(rebasing: part[0..<Int(m)]))
                    done += m
                } else {
                    done += try writeRunLocked(at: pos + done, part, hostHint: &hint)
                }
            }
            pos += n
        }
    }

    /// QEMU's `qcow2_subcluster_zeroize` on a subcluster-aligned range; false when the
    /// format cannot express it (v2 with a backing file, compressed clusters with
    /// subclusters) and zeros must be written instead.
    private func zeroize(_ from: UInt64, _ to: UInt64, unmap: Bool) throws -> Bool {
        if image.header.autoclearFeatures.contains(.dataFileRaw), let dataFile {
            try dataFile.writeZeros(at: from, length: to - from)
        }
        if image.header.version < 3 {
            guard !hasBacking, from % cs == 0 else { return false }
            // v2 without a backing file: discard (the clusters become unallocated).
            var pos = from
            while pos < to {
                try discardCluster(pos)
                pos = min(pos + cs, to)
            }
            return true
        }
        let headEnd = min(to, (from + cs - 1) & ~(cs - 1))
        let tailStart = to >= virtualSize ? to : max(headEnd, to & ~(cs - 1))
        if from < headEnd, try !zeroSubclusterRange(from, headEnd) { return false }
        var pos = headEnd
        while pos < tailStart {
            try zeroWholeCluster(pos, unmap: unmap)
            pos += cs
        }
        if tailStart < to, try !zeroSubclusterRange(tailStart, to) { return false }
        return true
    }

    /// QEMU's `zero_l2_subclusters`: zero bits on, allocation bits off.
    private func zeroSubclusterRange(_ from: UInt64, _ to: UInt64) throws -> Bool {
        guard g.extendedL2 else { return false }
        let clusterStart = from & ~(cs - 1)
        let table = try writableTable(Int(g.l1Index(clusterStart)))
        let index = Int(g.l2Index(clusterStart))
        let old = entry(table, index)
        if case .compressed = try kind(of: old, at: clusterStart) { return false }
        let sc = g.subclusterSize
        let first = (from - clusterStart) / sc, last = (to - clusterStart + sc - 1) / sc
        var mask: UInt64 = 0
        for i in first..<last { mask |= 1 << i }
        let bitmap = (old.bitmap | (mask << 32)) & ~mask
        if bitmap != old.bitmap { setEntry(table, index, L2Entry(rawValue: old.rawValue, bitmap: bitmap)) }
        return true
    }

    /// QEMU's `zero_in_l2_slice` for one cluster.
    private func zeroWholeCluster(_ clusterStart: UInt64, unmap mayUnmap: Bool) throws {
        let table = try writableTable(Int(g.l1Index(clusterStart)))
        let index = Int(g.l2Index(clusterStart))
        let old = entry(table, index)
        let oldKind = try kind(of: old, at: clusterStart)
        var allocated = false
        var compressed = false
        switch oldKind {
        case .normal, .zeroAllocated: allocated = true
        case .compressed: allocated = true; compressed = true
        default: break
        }
        let unmap = compressed || (mayUnmap && allocated)
        var new = L2Entry(rawValue: unmap ? 0 : old.rawValue, bitmap: old.bitmap)
        if g.extendedL2 {
            new.bitmap = 0xFFFF_FFFF_0000_0000
        } else {
            new.rawValue |= L2Entry.zeroFlag
        }
        guard new != old else { return }
        setEntry(table, index, new)
        if unmap {
            if let dataFile, case let .normal(h) = oldKind { dataFile.punchHole(at: h, length: min(cs, virtualSize - clusterStart)) }
            releaseOld(oldKind, punch: true)
        }
    }

    /// QEMU's `discard_in_l2_slice` (not a full discard) for one whole cluster.
    private func discardCluster(_ clusterStart: UInt64) throws {
        let l1i = Int(g.l1Index(clusterStart))
        let l1e = L1Entry(rawValue: layer.l1.withLock { l1i < $0.count ? $0[l1i] : 0 })
        if l1e.l2Offset == 0 && !hasBacking { return }
        let table = try writableTable(l1i)
        let index = Int(g.l2Index(clusterStart))
        let old = entry(table, index)
        let oldKind = try kind(of: old, at: clusterStart)
        var allocated = false
        switch oldKind {
        case .normal, .zeroAllocated, .compressed: allocated = true
        default: break
        }
        var new = old
        if hasBacking || allocated {
            if g.extendedL2 {
                new = L2Entry(rawValue: 0, bitmap: 0xFFFF_FFFF_0000_0000)
            } else {
                new = L2Entry(rawValue: image.header.version >= 3 ? L2Entry.zeroFlag : 0)
            }
        }
        guard new != old else { return }
        setEntry(table, index, new)
        if allocated {
            if let dataFile, case let .normal(h) = oldKind { dataFile.punchHole(at: h, length: min(cs, virtualSize - clusterStart)) }
            releaseOld(oldKind, punch: true)
        }
    }

    /// Guest discard (QEMU's `qcow2_co_pdiscard`): whole clusters become zero clusters (v3)
    /// or unallocated (v2) and their host clusters are released; partial clusters are left
    /// alone, and v2 images with a backing file ignore discards (unallocated would expose the
    /// backing data).
    func discard(at offset: UInt64, length: UInt64) throws {
        try lock.withLock {
            try ensureWritable()
            if image.header.version < 3 && hasBacking { return }
            let end = offset + length
            waitForClusters(offset, end)
            var pos = (offset + cs - 1) & ~(cs - 1)
            while pos < end {
                let clusterEnd = min(pos + cs, virtualSize)
                guard clusterEnd <= end else { break }
                try discardCluster(pos)
                pos = clusterEnd
            }
            invalidate(offset, end)
            try flushIfOverBudget()
        }
    }

    // MARK: Compressed writes

    /// Writes one whole cluster compressed (QEMU's `write -c`): only over an unallocated
    /// cluster; falls back to a normal write when compression does not save space.
    func writeCompressed(clusterStart: UInt64, _ data: UnsafeRawBufferPointer) throws {
        let valid = min(cs, virtualSize - clusterStart)
        guard clusterStart % cs == 0, UInt64(data.count) == valid else {
            throw QCOW2Error.invalidArgument("compressed writes must cover whole clusters")
        }
        guard dataFile == nil else { throw QCOW2Error.invalidArgument("compressed writes are not possible with an external data file") }
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs), alignment: 16)
        defer { input.deallocate() }
        input.initializeMemory(as: UInt8.self, repeating: 0)
        input.copyMemory(from: data)
        let output = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cs) - 1, alignment: 16)
        defer { output.deallocate() }
        let compressed = ClusterCodec.compress(image.header.compressionType, input: UnsafeRawBufferPointer(input), output: output)
        try lock.withLock {
            try ensureWritable()
            waitForClusters(clusterStart, clusterStart + cs)
            let table = try writableTable(Int(g.l1Index(clusterStart)))
            let index = Int(g.l2Index(clusterStart))
            let old = entry(table, index)
            let oldKind = try kind(of: old, at: clusterStart)
            switch oldKind {
            case .unallocated, .zeroPlain: break
            default: throw QCOW2Error.io(path: layer.path, operation: "compressed write over an allocated cluster", errno: 5)
            }
            guard let size = compressed else {
                try writeCluster(clusterStart, inCluster: 0, UnsafeRawBufferPointer(rebasing: input[0..<Int(valid)]))
                invalidate(clusterStart, clusterStart + cs)
                return
            }
            let offset = try allocateBytes(UInt64(size))
            try file.write(UnsafeRawBufferPointer(rebasing: output[0..<size]), at: offset)
            bumpFileEnd(offset + UInt64(size))
            let desc = CompressedDescriptor.encode(hostOffset: offset, length: UInt64(size), clusterBits: g.clusterBits)
            setEntry(table, index, L2Entry(rawValue: L2Entry.compressedFlag | desc))
            invalidate(clusterStart, clusterStart + cs)
            try flushIfOverBudget()
        }
    }

    private func allocateBytes(_ size: UInt64) throws -> UInt64 {
        try refcounts.allocateBytes(size)
    }

    // MARK: Header changes

    /// Rewrites cluster 0 after `body` changed the header (QEMU's `qcow2_update_header`:
    /// the whole cluster in one write, unknown extensions kept). Metadata is flushed first.
    private func rewriteHeader(_ body: (inout ImageHeader) throws -> Void) throws {
        try flushLocked()
        var img = image
        img.header.refcountTableOffset = refcounts.tableOffset
        img.header.refcountTableClusters = refcounts.tableClusters
        try body(&img)
        if img.backingFileName != nil && img.header.autoclearFeatures.contains(.dataFileRaw) {
            throw QCOW2Error.invalidArgument("a backing file is not allowed with data-file-raw")
        }
        guard var bytes = img.serializeCluster0() else {
            throw QCOW2Error.invalidArgument("the header extensions and backing file name do not fit in the first cluster")
        }
        bytes.append(contentsOf: [UInt8](repeating: 0, count: Int(cs) - bytes.count))
        try file.write(bytes, at: 0)
        try syncWithRefcounts()
        image = img
    }

    /// Sets a new backing file name and format (nil: no backing file); header only.
    func setBacking(name: String?, format: String?) throws {
        try lock.withLock {
            drainAllocations()
            try ensureWritable()
            try rewriteHeader { img in
                img.backingFileName = name
                img.extensions.removeAll { $0.type == HeaderExtension.backingFormatType }
                if let format, name != nil { img.extensions.append(.backingFormat(format)) }
            }
        }
    }

    /// `qemu-img amend` for qcow2: version up/downgrade, lazy refcounts, refcount width,
    /// backing file. Steps run in QEMU's order (upgrade first, downgrade last).
    func amend(compat: String?, lazyRefcounts: Bool?, refcountBits: Int?, backing: (name: String?, format: String?)?) throws {
        try lock.withLock {
            drainAllocations()
            try ensureWritable()
            var target = image.header.version
            if let compat {
                switch compat {
                case "1.1", "v3": target = 3
                case "0.10", "v2": target = 2
                default: throw QCOW2Error.invalidArgument("Invalid compatibility level: '\(compat)'")
                }
            }
            if target == 3 && image.header.version == 2 {
                try rewriteHeader { img in
                    img.header.version = 3
                    img.header.headerLength = UInt32(QCOW2Header.qemuV3Length)
                    img.header.refcountOrder = 4
                    if cs > 4096 && !img.extensions.contains(where: { $0.type == HeaderExtension.featureNameTableType }) {
                        img.extensions.append(.featureNameTable(FeatureNameEntry.qemuDefault))
                    }
                }
            }
            if let backing {
                try rewriteHeader { img in
                    img.backingFileName = backing.name
                    img.extensions.removeAll { $0.type == HeaderExtension.backingFormatType }
                    if let f = backing.format, backing.name != nil { img.extensions.append(.backingFormat(f)) }
                }
            }
            if let lazy = lazyRefcounts, lazy != image.header.compatibleFeatures.contains(.lazyRefcounts) {
                guard target >= 3 || !lazy else {
                    throw QCOW2Error.invalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
                }
                try rewriteHeader { img in
                    if lazy { img.header.compatibleFeatures.insert(.lazyRefcounts) } else { img.header.compatibleFeatures.remove(.lazyRefcounts) }
                }
            }
            if let bits = refcountBits, bits != image.header.refcountBits {
                guard bits > 0, bits <= 64, bits.nonzeroBitCount == 1 else {
                    throw QCOW2Error.invalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
                }
                guard target >= 3 || bits == 16 else {
                    throw QCOW2Error.invalidArgument("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)")
                }
                try flushLocked()
                var img = image
                try RefcountRebuild.rebuild(file: file, image: &img, newOrder: UInt32(bits.trailingZeroBitCount))
                image = img
                refcounts = try makeRefcountManager(img.header)
            }
            if target == 2 && image.header.version == 3 { try downgrade() }
        }
    }

    /// QEMU's `qcow2_downgrade`: zero clusters are expanded (v2 has no zero flag), then the
    /// header is rewritten as version 2.
    private func downgrade() throws {
        let h = image.header
        // QEMU's checks, in its order and words.
        guard h.refcountOrder == 4 else { throw QCOW2Error.invalidArgument("compat=0.10 requires refcount_bits=16") }
        guard !h.hasExternalDataFile else { throw QCOW2Error.invalidArgument("Cannot downgrade an image with a data file") }
        let features = h.incompatibleFeatures.subtracting(.dirty)  // refcounts are consistent once open
        guard features.subtracting(.compressionType).isEmpty else {
            throw QCOW2Error.invalidArgument("Cannot downgrade an image with incompatible features 0x\(String(features.rawValue, radix: 16)) set")
        }
        // v2 knows only zlib: a zstd image may be downgraded only while nothing is compressed.
        // Checked before anything changes (QEMU checks after expanding zero clusters, and
        // looks at the active state only; snapshots are checked here too).
        if h.compressionType != .deflate {
            try flushLocked()
            if try hasCompressedClusters() {
                throw QCOW2Error.invalidArgument("Cannot downgrade an image with zstd compression type and existing compressed clusters")
            }
        }
        // QEMU's qcow2_expand_zero_clusters: the active L2 tables are changed in place, also
        // those shared with snapshots (new clusters then get the table's refcount), then
        // every snapshot's tables on disk; tables already expanded have nothing left to do.
        let l1Count = layer.l1.withLock { $0.count }
        for l1i in 0..<l1Count {
            let l2 = L1Entry(rawValue: layer.l1.withLock { $0[l1i] }).l2Offset
            guard l2 != 0 else { continue }
            try loadTable(l2)
            let l2Refcount = try refcounts.refcount(ofCluster: l2 / cs)
            for index in 0..<Int(g.l2Entries) {
                let guest = (UInt64(l1i) << UInt64(g.clusterBits + g.l2EntriesBits)) + UInt64(index) * cs
                if let expanded = try expandedZeroEntry(entry(l2, index), at: guest, l2Refcount: l2Refcount) {
                    setEntry(l2, index, expanded.entry)
                    if let r = expanded.release {
                        for _ in 0..<r.count { pendingFrees.append((r.cluster * cs, cs, false)) }
                    }
                }
            }
            try flushIfOverBudget()
        }
        try flushLocked()
        try expandZeroClustersInSnapshots()
        invalidate(0, virtualSize)
        try rewriteHeader { img in
            img.header.compressionType = .deflate
            img.header.version = 2
            img.header.headerLength = UInt32(QCOW2Header.v2Length)
            img.header.incompatibleFeatures = []
            img.header.compatibleFeatures = []
            img.header.autoclearFeatures = []
            img.header.unknownTrailingFields = []
            img.extensions.removeAll { $0.type == HeaderExtension.featureNameTableType }
        }
    }

    /// The v2 form of a zero cluster for a downgrade (QEMU's expand_zero_clusters_in_l1), or
    /// nil if `e` is not one, with the data cluster whose references the caller must drop
    /// once the table is durable. Without a backing file a plain zero cluster becomes
    /// unallocated; otherwise it gets a new cluster of zeros, counted once per reference to
    /// its L2 table (`l2Refcount`). A preallocated zero cluster is zeroed in place, unless
    /// another table shares it: QEMU 7.2 zeroes it anyway, which destroys a snapshot's data
    /// and leaves a copied flag on a shared cluster; here the table gets its own cluster.
    func expandedZeroEntry(_ e: L2Entry, at guest: UInt64, l2Refcount: UInt64) throws
        -> (entry: L2Entry, release: (cluster: UInt64, count: UInt64)?)?
    {
        func freshZeroCluster() throws -> L2Entry {
            let host = try refcounts.allocate(clusters: 1)
            if l2Refcount > 1 { try refcounts.increment(cluster: host / cs, by: Int64(l2Refcount - 1)) }
            try [UInt8](repeating: 0, count: Int(cs)).withUnsafeBytes { try writeData($0, at: host) }
            bumpFileEnd(host + cs)
            return L2Entry(rawValue: host | (l2Refcount == 1 ? L2Entry.copiedFlag : 0))
        }
        switch try kind(of: e, at: guest) {
        case .zeroPlain where !hasBacking:
            return (L2Entry(rawValue: 0), nil)
        case .zeroPlain:
            return (try freshZeroCluster(), nil)
        case let .zeroAllocated(host):
            let dataRefcount = try refcounts.refcount(ofCluster: host / cs)
            if dataRefcount > l2Refcount {
                let entry = hasBacking ? try freshZeroCluster() : L2Entry(rawValue: 0)
                return (entry, (host / cs, l2Refcount))
            }
            try [UInt8](repeating: 0, count: Int(cs)).withUnsafeBytes { try writeData($0, at: host) }
            return (L2Entry(rawValue: host | (dataRefcount == 1 ? L2Entry.copiedFlag : 0)), nil)
        default:
            return nil
        }
    }

    /// Discards every cluster of the active L1 table so that the layer is empty and the
    /// backing file shows through everywhere (QEMU's `qcow2_make_empty` fallback path).
    func makeEmpty() throws {
        try lock.withLock {
            drainAllocations()
            try ensureWritable()
            let l1Count = layer.l1.withLock { $0.count }
            for l1i in 0..<l1Count {
                let e = L1Entry(rawValue: layer.l1.withLock { $0[l1i] })
                guard e.l2Offset != 0 else { continue }
                let table = try writableTable(l1i)
                for index in 0..<Int(g.l2Entries) {
                    let old = entry(table, index)
                    guard old.rawValue != 0 || old.bitmap != 0 else { continue }
                    let guest = (UInt64(l1i) << UInt64(g.clusterBits + g.l2EntriesBits)) + UInt64(index) * cs
                    let k = try kind(of: old, at: guest)
                    setEntry(table, index, L2Entry(rawValue: 0, bitmap: 0))
                    releaseOld(k, punch: true)
                }
                try flushIfOverBudget()
            }
            invalidate(0, virtualSize)
            try flushLocked()
        }
    }

    // MARK: Primitives for snapshot operations (SnapshotOperations.swift)

    var geometry: ClusterGeometry { g }
    var currentImage: ImageHeader { image }
    var refcountMaximum: UInt64 { refcounts.codec.maxValue }
    var refcountWidth: Int { refcounts.codec.bits }

    func withMetadataLock<T>(_ body: () throws -> T) throws -> T {
        try lock.withLock {
            drainAllocations()
            inFlight.drain()
            return try body()
        }
    }
    func flushMetadata() throws { try flushLocked() }
    func syncFile() throws { try syncWithRefcounts() }
    func refcountOf(_ cluster: UInt64) throws -> UInt64 { try refcounts.refcount(ofCluster: cluster) }
    /// Changes a refcount; a cluster whose refcount drops to zero is discarded in the file,
    /// as QEMU does for snapshot operations (QCOW2_DISCARD_SNAPSHOT).
    func adjustRefcount(_ cluster: UInt64, by delta: Int64) throws {
        do {
            try refcounts.increment(cluster: cluster, by: delta)
        } catch let e as RefcountManager.Corruption {
            try markCorrupt(e.description)
        }
        if delta < 0, try refcounts.refcount(ofCluster: cluster) == 0 {
            // A freed L2 table must not be written back by the next flush.
            let offset = cluster * cs
            l2Tables.remove(offset)
            dirtyTables.remove(offset)
            layer.dirtyL2.withLock { _ = $0.removeValue(forKey: offset) }
            l2Cache.invalidate(layer: layer.index, table: offset, tableSize: cs)
            file.punchHole(at: offset, length: cs)
        }
    }
    func allocateClusters(bytes: UInt64) throws -> UInt64 {
        let offset = try refcounts.allocate(clusters: (bytes + cs - 1) / cs)
        bumpFileEnd(offset + bytes)
        return offset
    }
    /// Drops references at once (the caller made the unlink durable already).
    /// Metadata names these host clusters as in use: each must lie inside the image file,
    /// else the image is marked corrupt (before any refcount changes: refcounting a
    /// cluster far past the end would grow the refcount structures, and the file, to it).
    func requireInsideFile(clusters: some Sequence<UInt64>, what: String) throws {
        let end = max(try file.size(), layer.fileEnd.load(ordering: .relaxed))
        for c in clusters {
            let (offset, overflow) = c.multipliedReportingOverflow(by: cs)
            if overflow || offset >= end {
                try markCorrupt("\(what): cluster \(c) (offset 0x\(String(offset, radix: 16))) lies beyond the end of the image file (0x\(String(end, radix: 16)) bytes)")
            }
        }
    }
    func releaseNow(offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        for c in (offset / cs)...((offset + length - 1) / cs) { try adjustRefcount(c, by: -1) }
    }
    func loadTableForSnapshot(_ offset: UInt64) throws { try loadTable(offset) }
    func tableEntry(_ table: UInt64, _ index: Int) -> L2Entry { entry(table, index) }
    func setTableEntry(_ table: UInt64, _ index: Int, _ e: L2Entry) { setEntry(table, index, e) }
    func invalidateAll() { invalidate(0, max(layer.virtualSize, image.header.size)) }

    func ensureWritableForSnapshots() throws {
        try ensureWritable()
        guard dataFile == nil else {
            throw QCOW2Error.unsupported(path: layer.path, "internal snapshots are not possible with an external data file")
        }
    }

    /// Replaces the in-memory active L1 entries (after they were written to disk).
    func setActiveL1(_ l1: [UInt64]) {
        layer.l1.withLock { mem in
            for i in 0..<min(mem.count, l1.count) { mem[i] = l1[i] }
        }
        for e in l1 where L1Entry(rawValue: e).l2Offset != 0 { l2Tables.insert(L1Entry(rawValue: e).l2Offset) }
    }

    func setSnapshotFields(count: UInt32, offset: UInt64) {
        image.header.nbSnapshots = count
        image.header.snapshotsOffset = offset
    }

    func setVirtualSizeField(_ size: UInt64) throws {
        image.header.size = size
        try writeHeaderField(at: 24, size)
        try syncWithRefcounts()
    }

    /// QEMU's `qcow2_grow_l1_table` (exact size): a new, larger copy of the active L1,
    /// synced, then the 12-byte header switch, then the old table is freed.
    func growActiveL1(to needed32: UInt32) throws {
        let needed = UInt64(needed32)
        let l1 = layer.l1.withLock { $0 }
        let oldOffset = image.header.l1TableOffset, oldSize = UInt64(image.header.l1Size)
        let clusters = (needed * 8 + cs - 1) / cs
        let newOffset = try refcounts.allocate(clusters: clusters)
        var bytes = [UInt8](repeating: 0, count: Int(needed * 8))
        // Entries past the ones this layer loaded (l1_size may exceed what the old size needed).
        let existing = try file.read(count: Int(oldSize * 8), at: oldOffset)
        bytes.replaceSubrange(0..<existing.count, with: existing)
        for (i, e) in l1.enumerated() { bytes.putBE(e, at: i * 8) }
        try file.write(bytes, at: newOffset)
        bumpFileEnd(newOffset + needed * 8)
        try syncWithRefcounts()
        var pair: [UInt8] = []
        pair.appendBE(UInt32(needed))
        pair.appendBE(newOffset)
        try file.write(pair, at: 36)
        try syncWithRefcounts()
        image.header.l1Size = UInt32(needed)
        image.header.l1TableOffset = newOffset
        if oldSize > 0 {
            do {
                try refcounts.release(offset: oldOffset, length: oldSize * 8)
            } catch let e as RefcountManager.Corruption {
                try markCorrupt(e.description)  // the old table was not refcounted
            }
        }
    }

    // MARK: Preallocation

    /// Preallocates the whole virtual disk of a freshly created image, as QEMU's
    /// `preallocate_co` (metadata) and the falloc/full branch of `qcow2_co_truncate` do:
    /// every cluster gets an L2 entry pointing at its own host cluster; with falloc/full the
    /// data area is allocated in the file (full also writes zeros).
    func preallocate(mode: String) throws {
        try lock.withLock {
            drainAllocations()
            try ensureWritable()
            let size = virtualSize
            let clusters = (size + cs - 1) / cs
            guard clusters > 0 else { return }
            if mode == "metadata" || dataFile != nil {
                var guest: UInt64 = 0
                var hint: UInt64?
                var hostEnd: UInt64 = 0
                var lastRun = (guest: UInt64(0), host: UInt64(0))
                while guest < clusters * cs {
                    let (table, index, count) = try sliceRun(at: guest, clustersLeft: clusters - guest / cs)
                    let host: UInt64
                    var n = count
                    if dataFile != nil {
                        host = guest
                    } else if let h = hint, let got = try refcounts.allocateAt(h / cs, count: count), got > 0 {
                        host = h
                        n = got
                    } else {
                        host = try refcounts.allocate(clusters: count)
                    }
                    for i in 0..<Int(n) { setEntry(table, index + i, L2Entry(rawValue: (host + UInt64(i) * cs) | L2Entry.copiedFlag)) }
                    hint = dataFile == nil ? host + n * cs : nil
                    hostEnd = max(hostEnd, host + n * cs)
                    lastRun = (guest, host)
                    guest += n * cs
                    try flushIfOverBudget()
                }
                try flushLocked()
                if let dataFile {
                    try dataFile.truncate(to: size)
                    if mode == "falloc" { try dataFile.preallocate(at: 0, length: size) }
                    if mode == "full" { try dataFile.writeZeros(at: 0, length: size) }
                } else {
                    // As qemu-img: the file must reach the host offset of the (sector-
                    // aligned) end of the disk. At a cluster boundary the file is
                    // extended; inside a cluster, zeros are written up to its end.
                    let alignedEnd = (size + 511) & ~511
                    let lastHostEnd = lastRun.host + (alignedEnd - lastRun.guest)
                    let fileSize = try file.size()
                    if lastHostEnd % cs == 0 {
                        if fileSize < lastHostEnd { try file.truncate(to: lastHostEnd) }
                    } else if fileSize < hostEnd {
                        try file.writeZeros(at: max(lastHostEnd, fileSize), length: hostEnd - max(lastHostEnd, fileSize))
                        bumpFileEnd(hostEnd)
                    }
                }
            } else {
                let lastUsed = try refcounts.lastUsedCluster(below: (try file.size() + cs - 1) / cs)
                let l2Tables = (clusters + g.l2Entries - 1) / g.l2Entries + 1
                let start = try refcounts.refcountArea(startCluster: lastUsed + 1, additionalClusters: clusters + l2Tables,
                                                       exactSize: true, newRefblockIndex: 0, newRefblockOffset: 0)
                guard let got = try refcounts.allocateAt(start, count: clusters), got == clusters else {
                    throw QCOW2Error.io(path: layer.path, operation: "preallocation", errno: 28)
                }
                let dataStart = start * cs, dataEnd = (start + clusters) * cs
                // Like QEMU's truncate with preallocation, fill from the old end of the file
                // (which may end inside the L1 cluster) to the end of the data area.
                let fillFrom = min(try file.size(), dataStart)
                if mode == "full" {
                    try file.writeZeros(at: fillFrom, length: dataEnd - fillFrom)
                } else {
                    try file.preallocate(at: fillFrom, length: dataEnd - fillFrom)
                }
                bumpFileEnd(dataEnd)
                var guest: UInt64 = 0
                while guest < clusters * cs {
                    let (table, index, count) = try sliceRun(at: guest, clustersLeft: clusters - guest / cs)
                    for i in 0..<Int(count) {
                        setEntry(table, index + i, L2Entry(rawValue: (dataStart + guest + UInt64(i) * cs) | L2Entry.copiedFlag))
                    }
                    guest += count * cs
                    try flushIfOverBudget()
                }
                try flushLocked()
            }
            invalidate(0, size)
        }
    }

    /// The writable L2 table for `guest`, the entry index, and how many clusters from there
    /// fit in the rest of its L2 slice.
    private func sliceRun(at guest: UInt64, clustersLeft: UInt64) throws -> (UInt64, Int, UInt64) {
        let table = try writableTable(Int(g.l1Index(guest)))
        let index = Int(g.l2Index(guest))
        let sliceEntries = Int(layer.sliceEntries)
        let left = UInt64((index / sliceEntries + 1) * sliceEntries - index)
        return (table, index, min(left, clustersLeft))
    }

    // MARK: Resize

    /// Changes the virtual size (QEMU's `qcow2_co_truncate` with preallocation off).
    /// Growing may move the L1 table (new copy, sync, 12-byte header switch, free the old);
    /// shrinking discards every cluster past the new end, frees L2 tables no longer
    /// needed, and truncates the file after the last used cluster. The image must be
    /// reopened to see the new size.
    func resize(to newSize: UInt64, allowShrink: Bool) throws {
        try lock.withLock {
            drainAllocations()
            try resizeLocked(to: newSize, allowShrink: allowShrink)
        }
    }

    /// `resize` with the writer's lock held (also used by snapshot apply).
    func resizeLocked(to newSize: UInt64, allowShrink: Bool) throws {
            try ensureWritable()
            try flushLocked()
            let old = image.header.size
            guard image.header.version >= 3 || image.header.nbSnapshots == 0 else {
                throw QCOW2Error.unsupported(path: layer.path, "Can't resize a v2 image which has snapshots")
            }
            guard let needed = g.l1EntriesNeeded(forVirtualSize: newSize), needed <= QCOW2Limits.maxL1Entries else {
                throw QCOW2Error.invalidArgument("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
            }
            if newSize < old {
                guard allowShrink else {
                    throw QCOW2Error.invalidArgument("Use the --shrink option to perform a shrink operation.")
                }

                var pos = (newSize + cs - 1) & ~(cs - 1)
                let l1Count = layer.l1.withLock { $0.count }
                while pos < old {
                    let l1i = Int(g.l1Index(pos))
                    let e = L1Entry(rawValue: l1i < l1Count ? layer.l1.withLock { $0[l1i] } : 0)
                    if e.l2Offset == 0 {
                        pos = (UInt64(l1i) + 1) * g.l2Coverage
                        continue
                    }
                    let table = try writableTable(l1i)
                    let index = Int(g.l2Index(pos))
                    let entry = entry(table, index)
                    if entry.rawValue != 0 || entry.bitmap != 0 {
                        let kind = try kind(of: entry, at: pos)
                        setEntry(table, index, L2Entry(rawValue: 0, bitmap: 0))
                        releaseOld(kind, punch: true)
                    }
                    pos += cs
                }
                try flushLocked()
                // L2 tables that only covered the removed part.
                for i in Int(needed)..<l1Count {
                    let e = L1Entry(rawValue: layer.l1.withLock { $0[i] })
                    guard e.l2Offset != 0 else { continue }
                    layer.l1.withLock { $0[i] = 0 }
                    dirtyL1.insert(i)
                    pendingFrees.append((e.l2Offset, cs, true))
                }
                try flushLocked()
                try syncWithRefcounts()
                try refcounts.shrinkTable()
            } else if needed > UInt64(image.header.l1Size) {
                try growActiveL1(to: UInt32(needed))
            }
            image.header.size = newSize
            try writeHeaderField(at: 24, newSize)
            try dataFile?.truncate(to: newSize)
            try syncWithRefcounts()
            if newSize < old {
                // Only ever shorten: the last used cluster may be a partly written snapshot
                // table that ends before its cluster does (QEMU leaves such a file as is).
                let fileSize = try file.size()
                let end = try refcounts.lastUsedCluster(below: (fileSize + cs - 1) / cs)
                if (end + 1) * cs < fileSize { try file.truncate(to: (end + 1) * cs) }
            }
    }

    // MARK: Flush

    private func flushIfOverBudget() throws {
        if layer.dirtyL2.withLock({ $0.count }) * Int(cs) > dirtyBudget { try flushLocked() }
    }

    /// Makes every completed write durable, metadata in dependency order.
    func flush() throws {
        try lock.withLock { try flushLocked() }
    }

    private func flushLocked() throws {
        // 1. Data and refcount increases.
        if durable { try dataFile?.sync() }
        try syncWithRefcounts()
        guard !dirtyTables.isEmpty || !dirtyL1.isEmpty || !pendingFrees.isEmpty else { return }
        // 2. L2 tables, then 3. the L1 entries that point at them.
        let tables = dirtyTables
        for t in tables {
            let bytes = layer.dirtyL2.withLock { $0[t]! }
            try file.write(bytes, at: t)
        }
        if !dirtyL1.isEmpty {
            try syncWithRefcounts()
            let l1 = layer.l1.withLock { $0 }
            for i in dirtyL1.sorted() {
                var be = l1[i].bigEndian
                try withUnsafeBytes(of: &be) { try file.write($0, at: image.header.l1TableOffset + UInt64(i) * 8) }
            }
        }
        try syncWithRefcounts()
        dirtyTables.removeAll()
        dirtyL1.removeAll()
        for t in tables { l2Cache.invalidate(layer: layer.index, table: t, tableSize: cs) }
        layer.dirtyL2.withLock { $0.removeAll() }
        // 4. Only now that nothing points at them, release unlinked clusters (after
        // in-place writes that may still target them have finished).
        inFlight.drain()
        let frees = pendingFrees
        pendingFrees.removeAll()
        // A cluster the old entry named that cannot be freed (beyond the end of the file,
        // no refcount block: the entry was corrupt) does not stop the other frees; the
        // image is marked corrupt once they are done (QEMU only reports its
        // "qcow2_free_clusters failed", after growing the file to reach the cluster).
        var corruption: RefcountManager.Corruption?
        for (offset, length, punch) in frees {
            let first = offset / cs, last = (offset + length - 1) / cs
            for c in first...last {
                do {
                    try refcounts.increment(cluster: c, by: -1)
                } catch let e as RefcountManager.Corruption {
                    corruption = corruption ?? e
                    continue
                }
                if punch, try refcounts.refcount(ofCluster: c) == 0 {
                    l2Tables.remove(c * cs)
                    file.punchHole(at: c * cs, length: cs)
                }
                if try refcounts.refcount(ofCluster: c) == 0 { l2Tables.remove(c * cs) }
            }
        }
        if !frees.isEmpty { try syncWithRefcounts() }
        if let corruption { try markCorrupt(corruption.description) }
    }

    /// Flushes and, if this writer set the dirty bit (lazy refcounts), clears it.
    func close() throws {
        try lock.withLock {
            drainAllocations()
            try flushLocked()
            if setDirtyBit {
                image.header.incompatibleFeatures.remove(.dirty)
                try writeHeaderField(at: 72, image.header.incompatibleFeatures.rawValue)
                try syncWithRefcounts()
                setDirtyBit = false
            }
        }
    }
}
