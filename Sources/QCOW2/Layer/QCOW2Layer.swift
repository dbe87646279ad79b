import QCOW2Format
import Synchronization

/// One qcow2 image of a chain, opened for reading: its validated header, its active L1
/// table, and the code that turns guest ranges into `LayerPiece`s by reading L2 slices.
///
/// The file itself is not held open here: the chain's `OpenFileCache` hands out handles,
/// so thousands of layers can be open under a small file-descriptor budget.
final class QCOW2Layer: Sendable {
    let path: String
    let index: Int32
    let image: ImageHeader
    let geometry: ClusterGeometry
    /// The active L1 entries covering the virtual size, and the file's known end. Mutable
    /// only for the writable top layer (its writer updates them under its own lock).
    let l1: Mutex<[UInt64]>
    let fileEnd: Atomic<UInt64>
    /// L2 tables changed in memory but not yet written (writable top layer only); reads
    /// consult them before the file.
    let dirtyL2 = Mutex<[UInt64: [UInt8]]>([:])
    let dataFilePath: String?
    /// How the layer's data clusters are encrypted (nil: plain).
    let encryption: LayerEncryption?

    var header: QCOW2Header { image.header }
    /// The guest size: the header's, or the snapshot's when a snapshot is opened.
    let virtualSize: UInt64
    /// The internal snapshot this layer shows (read-only), if any.
    let snapshot: SnapshotTableEntry?

    /// Bytes of L2 table read at a time (QEMU's default `l2-cache-entry-size` is 4 KiB).
    var sliceBytes: UInt64 { min(4096, geometry.clusterSize) }
    var sliceEntries: UInt64 { sliceBytes / geometry.l2EntrySize }
    /// Guest bytes covered by one L2 slice.
    var sliceCoverage: UInt64 { sliceEntries << UInt64(geometry.clusterBits) }

    /// Reads and validates the header and L1 table of an open image file.
    init(path: String, index: Int32, file: FileHandle, options: OpenOptions) throws {
        self.path = path
        self.index = index
        let size = try file.size()
        fileEnd = Atomic(size)
        image = try Self.readHeader(file: file, path: path, fileSize: size)
        let h = image.header
        geometry = ClusterGeometry(clusterBits: h.clusterBits, extendedL2: h.hasExtendedL2)

        if h.cryptMethodRaw != 0 {
            encryption = try LayerEncryption(
                image: image, path: path, file: file, fileSize: size, clusterSize: geometry.clusterSize,
                passphrase: options.secrets.passphrase(forDepth: Int(index)), writable: options.writable && index == 0,
                allowMissingSecret: options.allowMissingSecrets)
        } else {
            encryption = nil
        }
        if h.incompatibleFeatures.contains(.corrupt) && options.writable {
            throw QCOW2Error.unsupported(path: path, "image is corrupt; cannot be opened read/write")
        }

        // External data file.
        if h.hasExternalDataFile {
            guard let name = image.externalDataFile else {
                throw QCOW2Error.unsupported(path: path, "image has an external data file but does not name it ('data-file' is required)")
            }
            guard options.allowExternalDataFiles else {
                throw QCOW2Error.chain(path: path, "image uses external data file '\(name)', which this open does not allow")
            }
            dataFilePath = Paths.resolve(name, relativeTo: path)
        } else {
            dataFilePath = nil
        }

        // Active L1 table: only the entries that cover the virtual size matter for reads;
        // they must lie inside the file (this also bounds the allocation by the file size).
        var l1Offset = h.l1TableOffset, l1Size = UInt64(h.l1Size), guestSize = h.size
        if index == 0, let wanted = options.snapshot {
            guard !options.writable else {
                throw QCOW2Error.invalidArgument("snapshots can only be opened read-only")
            }
            let table = try SnapshotTable.read(file: file, image: image, path: path)
            // "snapshot.id=X,snapshot.name=Y" selects by those parts; a bare key is an ID or a name.
            var id: String?, name: String?
            for part in wanted.split(separator: ",") {
                if part.hasPrefix("snapshot.id=") { id = String(part.dropFirst("snapshot.id=".count)) }
                if part.hasPrefix("snapshot.name=") { name = String(part.dropFirst("snapshot.name=".count)) }
            }
            let found = (id != nil || name != nil) ? SnapshotTable.find(id: id, name: name, in: table) : SnapshotTable.find(wanted, in: table)
            guard let sn = found else {
                throw QCOW2Error.invalidArgument("\(path): Can't find snapshot '\(wanted)'")
            }
            l1Offset = sn.l1TableOffset
            l1Size = UInt64(sn.l1Size)
            // qemu-img reads a snapshot at the image's current size (zeros past the
            // snapshot's own end).
            guestSize = h.size
            snapshot = sn
        } else {
            snapshot = nil
        }
        virtualSize = guestSize
        guard let neededEntries = geometry.l1EntriesNeeded(forVirtualSize: guestSize), neededEntries <= QCOW2Limits.maxL1Entries else {
            throw QCOW2Error.format(path: path, .invalidField("size", value: guestSize, reason: "virtual size too large for this cluster size"))
        }
        // Entries past l1_size are unallocated (a snapshot's L1 may be shorter than its size needs).
        let needed = min(neededEntries, l1Size)
        let l1Bytes = needed * 8
        if needed > 0 {
            guard l1Offset != 0, l1Offset <= size, l1Bytes <= size - l1Offset else {
                throw QCOW2Error.format(path: path, .invalidField("l1_table_offset", value: l1Offset,
                    reason: "L1 table of \(needed) entries extends past the end of the file (\(size) bytes)"))
            }
        }
        var l1 = [UInt64](repeating: 0, count: Int(needed))
        if needed > 0 {
            try l1.withUnsafeMutableBytes { (raw) in
                try file.read(into: raw, at: l1Offset)
            }
            for i in l1.indices { l1[i] = UInt64(bigEndian: l1[i]) }
        }
        self.l1 = Mutex(l1)
    }

    /// QEMU's `qcow2_detect_metadata_preallocation`: true when far more clusters carry a
    /// refcount than the file really occupies. QEMU then reports data clusters that are holes
    /// in the file as reading zeros, so `map` does the same. Reads at most the refcount
    /// table and blocks covering the file.
    func detectMetadataPreallocation(file: FileHandle) throws -> Bool {
        let cs = geometry.clusterSize
        let realClusters = try file.allocatedSize() / cs
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        let clusters = (try file.size() + cs - 1) / cs
        let h = header
        let codec = RefcountBlockCodec(order: h.refcountOrder)
        let perBlock = UInt64(codec.entries(clusterSize: Int(cs)))
        let tableEntries = min(UInt64(h.refcountTableClusters) * cs / 8, (clusters + perBlock - 1) / perBlock)
        guard tableEntries > 0 else { return false }
        let table = try file.read(count: Int(tableEntries * 8), at: h.refcountTableOffset)
        var counted: UInt64 = 0
        for t in 0..<Int(tableEntries) {
            let blockOffset = table.withUnsafeBytes { RefcountTableEntry(rawValue: loadBE64($0, t * 8)).blockOffset }
            guard blockOffset != 0, blockOffset % cs == 0 else { continue }
            let block = try file.read(count: Int(cs), at: blockOffset)
            let first = UInt64(t) * perBlock
            block.withUnsafeBytes { raw in
                for i in 0..<Int(min(perBlock, clusters - first)) where codec.get(raw, i) > 0 { counted += 1 }
            }
            if counted > threshold { return true }
        }
        return false
    }

    static func readHeader(file: FileHandle, path: String, fileSize: UInt64) throws -> ImageHeader {
        // Read a prefix first: for 2 MiB clusters, cluster 0 is large and almost all of it
        // is padding. Read the rest only if the extensions run past the prefix.
        let prefix = 65536
        var bytes = try file.read(count: Int(min(UInt64(prefix), max(fileSize, 104))), at: 0)
        let fixed: QCOW2Header
        do { fixed = try QCOW2Header.parse(bytes) } catch { throw QCOW2Error.format(path: path, error) }
        let needed = ImageHeader.bytesNeeded(for: fixed)
        if needed > bytes.count && UInt64(bytes.count) < fileSize {
            bytes = try file.read(count: needed, at: 0)
        } else if needed > bytes.count {
            bytes.append(contentsOf: [UInt8](repeating: 0, count: needed - bytes.count))
        }
        do {
            return try ImageHeader.parse(bytes)
        } catch {
            if case .truncated = error, needed > bytes.count {
                bytes = try file.read(count: needed, at: 0)
                do { return try ImageHeader.parse(bytes) } catch { throw QCOW2Error.format(path: path, error) }
            }
            throw QCOW2Error.format(path: path, error)
        }
    }

    /// A run of L2 entries held in memory: entries `first..<first+count` of the table at `table`.
    struct EntryRun {
        var table: UInt64 = 0
        var first: UInt64 = 0
        var count: UInt64 = 0
        var bytes: [UInt8] = []

        func covers(_ table: UInt64, _ index: UInt64) -> Bool {
            self.table == table && index >= first && index < first + count
        }
    }

    /// Appends the pieces of each range (sorted, inside the virtual size) to `out`.
    ///
    /// The chain index calls this once per layer per region with every range still
    /// unresolved. A lower layer reads the L2 entries spanning all the ranges with one
    /// `pread` (they are needed once: the chain index keeps the result); the top layer
    /// reads 4 KiB slices through the shared L2 cache, since writes reuse them.
    func map(ranges: [Range<UInt64>], files: OpenFileCache, l2Cache: L2SliceCache, into out: inout [LayerPiece]) throws {
        guard let spanEnd = ranges.last?.upperBound else { return }
        var run = EntryRun()
        var l1Index = UInt64.max, l1Raw: UInt64 = 0
        for r in ranges {
            try map(start: r.lowerBound, end: r.upperBound, spanEnd: spanEnd, files: files, l2Cache: l2Cache,
                    run: &run, l1Index: &l1Index, l1Raw: &l1Raw, into: &out)
        }
    }

    /// Loads the L2 entries around `index` of the table at `l2Offset`: the whole table when
    /// it is dirty in memory, a cached 4 KiB slice for the top layer, else entries `index`
    /// through `lastNeeded` with one read.
    private func loadRun(table l2Offset: UInt64, index: UInt64, lastNeeded: UInt64, files: OpenFileCache,
                         l2Cache: L2SliceCache, into run: inout EntryRun) throws {
        let g = geometry
        if let table = dirtyL2.withLock({ $0[l2Offset] }) {
            run = EntryRun(table: l2Offset, first: 0, count: g.l2Entries, bytes: table)
        } else if self.index == 0 {
            let sliceIndex = index / sliceEntries
            let bytes = try l2Cache.slice(layer: self, host: l2Offset + sliceIndex * sliceBytes, files: files)
            run = EntryRun(table: l2Offset, first: sliceIndex * sliceEntries, count: sliceEntries, bytes: bytes)
        } else {
            let count = min(g.l2Entries - index, max(1, lastNeeded + 1 - index))
            let bytes = try files.handle(FileKey(layer: self.index, dataFile: false))
                .read(count: Int(count * g.l2EntrySize), at: l2Offset + index * g.l2EntrySize)
            run = EntryRun(table: l2Offset, first: index, count: count, bytes: bytes)
        }
    }

    private func map(start: UInt64, end: UInt64, spanEnd: UInt64, files: OpenFileCache, l2Cache: L2SliceCache,
                     run: inout EntryRun, l1Index: inout UInt64, l1Raw: inout UInt64, into out: inout [LayerPiece]) throws {
        let g = geometry
        let cs = g.clusterSize
        var pos = start
        while pos < end {
            let l1i = g.l1Index(pos)
            let l2Start = l1i << UInt64(g.clusterBits + g.l2EntriesBits)
            let l2End = min(end, l2Start &+ g.l2Coverage)
            if l1i != l1Index {
                l1Index = l1i
                l1Raw = l1.withLock { l1i < UInt64($0.count) ? $0[Int(l1i)] : 0 }
            }
            let l2Offset = L1Entry(rawValue: l1Raw).l2Offset
            if l2Offset == 0 {
                LayerPiece.append(LayerPiece(start: pos, length: l2End - pos, kind: .unallocated, host: LayerPiece.noHost, inDataFile: false), to: &out)
                pos = l2End
                continue
            }
            try checkL2Offset(l2Offset, l1Index: l1i)
            while pos < l2End {
                let l2i = g.l2Index(pos)
                if !run.covers(l2Offset, l2i) {
                    let lastNeeded = max(l2i, (min(spanEnd, l2Start + g.l2Coverage) - 1 - l2Start) / cs)
                    try loadRun(table: l2Offset, index: l2i, lastNeeded: lastNeeded, files: files, l2Cache: l2Cache, into: &run)
                }
                let runGuestEnd = min(l2End, l2Start + (run.first + run.count) * cs)
                let first = run.first
                try run.bytes.withUnsafeBytes { (raw) in
                    while pos < runGuestEnd {
                        let i = Int(g.l2Index(pos) - first)
                        // Fast path for the common case in deep, sparse chains: a run of
                        // all-zero (unallocated) entries becomes one piece without decoding.
                        if !g.extendedL2 && raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) == 0 {
                            var j = i + 1
                            let last = Int((runGuestEnd - 1 - l2Start) / cs - first)
                            while j <= last && raw.loadUnaligned(fromByteOffset: j * 8, as: UInt64.self) == 0 { j += 1 }
                            let zeroEnd = min(runGuestEnd, l2Start + (first + UInt64(j)) * cs)
                            if var lastPiece = out.last, lastPiece.kind == .unallocated, !lastPiece.hasHost, lastPiece.end == pos {
                                lastPiece.length = zeroEnd - lastPiece.start
                                out[out.count - 1] = lastPiece
                            } else {
                                out.append(LayerPiece(start: pos, length: zeroEnd - pos, kind: .unallocated, host: LayerPiece.noHost, inDataFile: false))
                            }
                            pos = zeroEnd
                            continue
                        }
                        let entry: L2Entry
                        if g.extendedL2 {
                            entry = L2Entry(rawValue: loadBE64(raw, i * 16), bitmap: loadBE64(raw, i * 16 + 8))
                        } else {
                            entry = L2Entry(rawValue: loadBE64(raw, i * 8))
                        }
                        let clusterStart = pos & ~(cs - 1)
                        let clusterEnd = min(runGuestEnd, clusterStart + cs)
                        try appendCluster(entry, clusterStart: clusterStart, from: pos, to: clusterEnd, into: &out)
                        pos = clusterEnd
                    }
                }
            }
        }
    }

    /// Rejects an L2 table offset that is unaligned or past the end of the file.
    private func checkL2Offset(_ l2Offset: UInt64, l1Index l1i: UInt64) throws {
        guard geometry.offsetInCluster(l2Offset) == 0 else {
            throw QCOW2Error.corrupt(path: path, "L2 table offset 0x\(String(l2Offset, radix: 16)) unaligned (L1 index \(l1i))")
        }
        guard l2Offset < fileEnd.load(ordering: .relaxed) else {
            throw QCOW2Error.corrupt(path: path, "L2 table offset 0x\(String(l2Offset, radix: 16)) (L1 index \(l1i)) lies beyond the end of the file")
        }
    }

    /// Whether `claim(_:depth:files:into:)` can serve this layer for `pending`: a read-only
    /// lower layer with the same cluster size, standard L2 entries, covering the range.
    func canClaim(_ pending: PendingClusters) -> Bool {
        index != 0 && !geometry.extendedL2 && geometry.clusterBits == pending.clusterBits && pending.end <= virtualSize
    }

    /// The bitmap form of `map(ranges:)` for deep chains: appends the pieces of the pending
    /// clusters this layer allocates to `result` (at `depth`) and clears their bits. Per L2
    /// table it reads the entries between the first and last pending cluster with one
    /// `pread` and decodes only the non-zero ones.
    func claim(_ pending: inout PendingClusters, depth: Int32, files: OpenFileCache, scratch: inout [UInt64],
               into result: inout [ChainExtent]) throws {
        let g = geometry
        var pieces: [LayerPiece] = []
        var c = 0
        while c < pending.count {
            let (guest, _) = pending.guestRange(c)
            let l2i = Int(g.l2Index(guest))
            let tableEnd = min(pending.count, c + Int(g.l2Entries) - l2i)
            defer { c = tableEnd }
            guard let (lo, hi) = pending.bounds(in: c, tableEnd) else { continue }
            let l1i = g.l1Index(guest)
            let l1Raw = l1.withLock { l1i < UInt64($0.count) ? $0[Int(l1i)] : 0 }
            let l2Offset = L1Entry(rawValue: l1Raw).l2Offset
            if l2Offset == 0 { continue }
            try checkL2Offset(l2Offset, l1Index: l1i)
            let firstIndex = UInt64(l2i + (lo - c))
            let count = hi - lo + 1
            if scratch.count < count { scratch = [UInt64](repeating: 0, count: Int(g.l2Entries)) }
            let file = try files.handle(FileKey(layer: index, dataFile: false))
            try scratch.withUnsafeMutableBytes { raw in
                try file.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<count * 8]), at: l2Offset + firstIndex * 8)
            }
            // Walk the pending bits directly (no closure: this loop runs for every pending
            // cluster of every layer) and decode only non-zero entries. Entries stay
            // big-endian: only zero / non-zero matters until one is decoded.
            var words = pending.words
            try scratch.withUnsafeBufferPointer { entries in
                guard let base = entries.baseAddress else { return }
                for w in (lo >> 6)...(hi >> 6) {
                    guard words[w] != 0 else { continue }
                    // The entries of this word's clusters that were read (lo...hi).
                    let jStart = max(lo - w << 6, 0), jEnd = min(hi - w << 6 + 1, 64)
                    let q = base + (w << 6 - lo)
                    // Deep layers hold few clusters: most words are all zero (an OR that
                    // vectorizes); only the others get a per-entry mask.
                    var any: UInt64 = 0
                    for j in jStart..<jEnd { any |= q[j] }
                    guard any != 0 else { continue }
                    var nonZero: UInt64 = 0
                    for j in jStart..<jEnd where q[j] != 0 { nonZero |= 1 << UInt64(j) }
                    var bits = words[w] & nonZero
                    while bits != 0 {
                        let j = bits.trailingZeroBitCount
                        bits &= bits - 1
                        let cl = w << 6 + j
                        let (from, to) = pending.guestRange(cl)
                        pieces.removeAll(keepingCapacity: true)
                        try appendCluster(L2Entry(rawValue: UInt64(bigEndian: q[j])), clusterStart: from, from: from, to: to, into: &pieces)
                        guard let piece = pieces.first, piece.kind != .unallocated else { continue }
                        result.append(ChainExtent(piece: piece, depth: depth))
                        words[w] &= ~(1 << UInt64(j))
                    }
                }
            }
            pending.words = words
        }
    }

    private func appendCluster(_ entry: L2Entry, clusterStart: UInt64, from: UInt64, to: UInt64, into out: inout [LayerPiece]) throws {
        let kind: ClusterKind
        do {
            kind = try entry.clusterKind(geometry: geometry, version: header.version, externalData: header.hasExternalDataFile)
        } catch {
            throw QCOW2Error.corrupt(path: path, "guest offset 0x\(String(clusterStart, radix: 16)): \(error)")
        }
        let inData = dataFilePath != nil
        if !geometry.extendedL2 {
            let piece: LayerPiece
            switch kind {
            case .unallocated:
                piece = LayerPiece(start: from, length: to - from, kind: .unallocated, host: LayerPiece.noHost, inDataFile: false)
            case .zeroPlain:
                piece = LayerPiece(start: from, length: to - from, kind: .zero, host: LayerPiece.noHost, inDataFile: false)
            case let .zeroAllocated(host):
                piece = LayerPiece(start: from, length: to - from, kind: .zero, host: host + (from - clusterStart), inDataFile: inData)
            case let .normal(host):
                piece = LayerPiece(start: from, length: to - from, kind: .data, host: host + (from - clusterStart), inDataFile: inData)
            case let .compressed(d):
                piece = LayerPiece(start: from, length: to - from, kind: .compressed, host: d.hostOffset, inDataFile: false,
                                   compressedSize: d.compressedSize, clusterStart: clusterStart)
            }
            LayerPiece.append(piece, to: &out)
            return
        }
        if case let .compressed(d) = kind {
            LayerPiece.append(LayerPiece(start: from, length: to - from, kind: .compressed, host: d.hostOffset, inDataFile: false,
                                         compressedSize: d.compressedSize, clusterStart: clusterStart), to: &out)
            return
        }
        let host: UInt64?
        switch kind {
        case let .normal(h), let .zeroAllocated(h): host = h
        default: host = nil
        }
        let sc = geometry.subclusterSize
        var pos = from
        while pos < to {
            let sub = Int((pos - clusterStart) / sc)
            let subEnd = min(to, clusterStart + UInt64(sub + 1) * sc)
            let t = entry.subclusterType(sub, kind: kind)
            let hostHere = host.map { $0 + (pos - clusterStart) } ?? LayerPiece.noHost
            let piece: LayerPiece
            switch t {
            case .invalid:
                throw QCOW2Error.corrupt(path: path, "guest offset 0x\(String(clusterStart, radix: 16)): invalid subcluster bitmap 0x\(String(entry.bitmap, radix: 16)) in L2 entry 0x\(String(entry.rawValue, radix: 16))")
            case .normal:
                piece = LayerPiece(start: pos, length: subEnd - pos, kind: .data, host: hostHere, inDataFile: inData)
            case .zeroAllocated:
                piece = LayerPiece(start: pos, length: subEnd - pos, kind: .zero, host: hostHere, inDataFile: inData)
            case .zeroPlain:
                piece = LayerPiece(start: pos, length: subEnd - pos, kind: .zero, host: LayerPiece.noHost, inDataFile: false)
            case .unallocatedAllocated:
                // Host space is reserved but unused; QEMU still reports its offset when no
                // backing layer takes over.
                piece = LayerPiece(start: pos, length: subEnd - pos, kind: .unallocated, host: hostHere, inDataFile: inData)
            case .unallocatedPlain, .compressed:
                piece = LayerPiece(start: pos, length: subEnd - pos, kind: .unallocated, host: LayerPiece.noHost, inDataFile: false)
            }
            LayerPiece.append(piece, to: &out)
            pos = subEnd
        }
    }
}

/// A bounded cache of L2 table slices shared by every layer of a chain (QEMU's
/// `l2-cache-size`). Entries are the raw big-endian slice bytes.
final class L2SliceCache: Sendable {
    private struct Key: Hashable { var layer: Int32; var host: UInt64 }
    private let cache: Mutex<LRUCache<Key, [UInt8]>>
    private let generation = Atomic<UInt64>(0)

    init(budget: Int) { cache = Mutex(LRUCache(budget: budget)) }

    func slice(layer: QCOW2Layer, host: UInt64, files: OpenFileCache) throws -> [UInt8] {
        let key = Key(layer: layer.index, host: host)
        if let s = cache.withLock({ $0.value(for: key) }) { return s }
        let before = generation.load(ordering: .acquiring)
        let file = try files.handle(FileKey(layer: layer.index, dataFile: false))
        let bytes = try file.read(count: Int(layer.sliceBytes), at: host)
        cache.withLock { c in
            if generation.load(ordering: .acquiring) == before { c.insert(bytes, for: key, cost: bytes.count + 64) }
        }
        return bytes
    }

    /// Drops cached slices of one L2 table (after it is rewritten on disk).
    func invalidate(layer: Int32, table: UInt64, tableSize: UInt64) {
        cache.withLock { c in
            generation.add(1, ordering: .releasing)
            c.removeAll { $0.layer == layer && $0.host >= table && $0.host < table + tableSize }
        }
    }
}
