import Synchronization

/// One resolved piece of the guest disk: which layer serves it (`depth`), and how.
struct ChainExtent: Sendable {
    var piece: LayerPiece
    /// Index of the layer that serves the range (0 = top). For ranges no layer allocates,
    /// the last layer consulted, as QEMU reports it.
    var depth: Int32

    var start: UInt64 { piece.start }
    var end: UInt64 { piece.end }
    /// Allocated in some layer (false: reads as zeros because nothing below has it).
    var present: Bool { piece.kind != .unallocated }

    /// The part of this extent inside `range` (which must overlap it).
    func trimmed(to range: Range<UInt64>) -> ChainExtent {
        var e = self
        let s = max(start, range.lowerBound), t = min(end, range.upperBound)
        if piece.hasHost && piece.kind != .compressed { e.piece.host = piece.host + (s - start) }
        e.piece.start = s
        e.piece.length = t - s
        return e
    }
}

/// The chain-wide index: the key structure that makes a read cost the same at depth 1000
/// as at depth 1.
///
/// The guest disk is cut into regions (one L2 slice of the top layer, e.g. 32 MiB for
/// 64 KiB clusters). The first access to a region resolves it top-down across the chain
/// once: every layer is asked only about the ranges still unresolved, reads each of its L2
/// slices at most once, and resolution stops as soon as nothing is left. The result, a
/// short sorted list of extents (layer, kind, host offset, merged where contiguous), is
/// kept in a bounded LRU. Afterwards a read is a binary search plus one `pread` per extent,
/// whatever the depth. Lower layers are read-only while open, so resolutions never go
/// stale; writes to the top layer invalidate only the regions they touch.
final class ChainIndex: Sendable {
    let layers: [Layer]
    let files: OpenFileCache
    let l2Cache: L2SliceCache
    let regionBits: UInt32
    let virtualSize: UInt64
    private let cache: Mutex<LRUCache<UInt64, [ChainExtent]>>
    /// Bumped by every invalidation, so a resolution that raced with a write is not cached.
    private let generation = Atomic<UInt64>(0)

    init(layers: [Layer], files: OpenFileCache, l2Cache: L2SliceCache, budget: Int) {
        self.layers = layers
        self.files = files
        self.l2Cache = l2Cache
        virtualSize = layers.first?.virtualSize ?? 0
        // Region = what one L2 table of the top layer maps (512 MiB with 64 KiB clusters),
        // bounded to [64 KiB, 1 GiB]: each lower layer then reads the entries of a region
        // with one pread, and a whole-disk scan needs few resolutions.
        var coverage: UInt64 = 512 << 20
        if case let .qcow2(top)? = layers.first { coverage = top.geometry.l2Coverage }
        coverage = min(max(coverage, 64 << 10), 1 << 30)
        regionBits = UInt32(63 - coverage.leadingZeroBitCount)
        cache = Mutex(LRUCache(budget: budget))
    }

    var regionSize: UInt64 { 1 << UInt64(regionBits) }

    /// The extents of region `r`, resolving it if it is not cached.
    func region(_ r: UInt64) throws -> [ChainExtent] {
        if let hit = cache.withLock({ $0.value(for: r) }) { return hit }
        let before = generation.load(ordering: .acquiring)
        let extents = try resolve(r)
        cache.withLock { c in
            if generation.load(ordering: .acquiring) == before {
                c.insert(extents, for: r, cost: 64 + extents.count * MemoryLayout<ChainExtent>.stride)
            }
        }
        return extents
    }

    /// Forgets cached resolutions overlapping `[start, end)` (after the top layer changes).
    func invalidate(start: UInt64, end: UInt64) {
        guard end > start else { return }
        let first = start >> UInt64(regionBits), last = (end - 1) >> UInt64(regionBits)
        cache.withLock { c in
            generation.add(1, ordering: .releasing)
            if last - first > UInt64(c.count) {
                c.removeAll()
            } else {
                for r in first...last { c.removeValue(for: r) }
            }
        }
    }

    func invalidateAll() {
        cache.withLock { c in
            generation.add(1, ordering: .releasing)
            c.removeAll()
        }
    }

    /// Re-resolves `[start, end)` after the top layer changed there, and splices the result
    /// into the cached regions that cover it (cheaper than dropping whole regions: a write
    /// would otherwise make the next read re-resolve 32 MiB through the whole chain).
    func refresh(start: UInt64, end: UInt64) throws {
        guard end > start else { return }
        let first = start >> UInt64(regionBits), last = (end - 1) >> UInt64(regionBits)
        for r in first...last {
            let rs = max(start, r << UInt64(regionBits)), re = min(end, (r + 1) << UInt64(regionBits), virtualSize)
            guard rs < re else { continue }
            let fresh = try resolve(range: rs..<re)
            cache.withLock { c in
                generation.add(1, ordering: .releasing)
                guard let old = c.removeValue(for: r) else { return }
                var spliced: [ChainExtent] = []
                spliced.reserveCapacity(old.count + fresh.count)
                for e in old where e.start < rs {
                    spliced.append(e.end > rs ? e.trimmed(to: e.start..<rs) : e)
                }
                spliced.append(contentsOf: fresh)
                for e in old where e.end > re {
                    spliced.append(e.start < re ? e.trimmed(to: re..<e.end) : e)
                }
                c.insert(spliced, for: r, cost: 64 + spliced.count * MemoryLayout<ChainExtent>.stride)
            }
        }
    }

    private func resolve(_ r: UInt64) throws -> [ChainExtent] {
        let start = r << UInt64(regionBits)
        return try resolve(range: start..<min(virtualSize, start + regionSize))
    }

    /// Resolves a guest range top-down through the chain.
    private func resolve(range: Range<UInt64>) throws -> [ChainExtent] {
        let start = range.lowerBound, end = range.upperBound
        guard start < end else { return [] }
        var result: [ChainExtent] = []
        var pending: [Range<UInt64>] = [start..<end]
        var pieces: [LayerPiece] = []
        // Deeper down, the pending ranges fragment; lower qcow2 layers with the top's
        // cluster size then work on a bitmap of pending clusters instead (PendingClusters).
        var bitmap: PendingClusters?
        var scratch: [UInt64] = []
        for (i, layer) in layers.enumerated() {
            let depth = Int32(i)
            if case let .qcow2(l) = layer, i > 0 {
                if bitmap == nil, pending.count > 1, l.geometry.clusterBits >= 9 {
                    bitmap = PendingClusters(ranges: pending, start: start & ~(l.geometry.clusterSize - 1), end: end,
                                             clusterBits: l.geometry.clusterBits)
                }
                if var b = bitmap, l.canClaim(b) {
                    try l.claim(&b, depth: depth, files: files, scratch: &scratch, into: &result)
                    if b.isEmpty { bitmap = nil; pending = []; break }
                    bitmap = b
                    continue
                }
            }
            if let b = bitmap {
                pending = b.ranges()
                bitmap = nil
            }
            if pending.isEmpty { break }
            // The part of a range past a (shorter) backing file reads as zeros; QEMU reports
            // it as not present, at the depth of the layer above.
            let size = layer.virtualSize
            var inside: [Range<UInt64>] = []
            for p in pending {
                if p.upperBound > size {
                    let cut = max(p.lowerBound, size)
                    result.append(ChainExtent(piece: LayerPiece(start: cut, length: p.upperBound - cut, kind: .unallocated,
                                                                host: LayerPiece.noHost, inDataFile: false), depth: depth - 1))
                }
                if p.lowerBound < size { inside.append(p.lowerBound..<min(p.upperBound, size)) }
            }
            pieces.removeAll(keepingCapacity: true)
            switch layer {
            case let .qcow2(l): try l.map(ranges: inside, files: files, l2Cache: l2Cache, into: &pieces)
            case let .raw(l):
                for p in inside { try l.map(start: p.lowerBound, end: p.upperBound, files: files, into: &pieces) }
            }
            var next: [Range<UInt64>] = []
            let isLast = i == layers.count - 1
            for p in pieces {
                if p.kind == .unallocated && !isLast {
                    if let last = next.last, last.upperBound == p.start {
                        next[next.count - 1] = last.lowerBound..<p.end
                    } else {
                        next.append(p.start..<p.end)
                    }
                } else {
                    result.append(ChainExtent(piece: p, depth: depth))
                }
            }
            pending = next
        }
        if let b = bitmap { pending = b.ranges() }
        let lastDepth = Int32(layers.count - 1)
        for p in pending {
            result.append(ChainExtent(piece: LayerPiece(start: p.lowerBound, length: p.upperBound - p.lowerBound, kind: .unallocated,
                                                        host: LayerPiece.noHost, inDataFile: false), depth: lastDepth))
        }
        result.sort { $0.start < $1.start }
        // Merge neighbours from the same layer that are contiguous in guest and host space.
        var merged: [ChainExtent] = []
        merged.reserveCapacity(result.count)
        for e in result {
            if var last = merged.last, last.depth == e.depth {
                var pieces = [last.piece]
                LayerPiece.append(e.piece, to: &pieces)
                if pieces.count == 1 {
                    last.piece = pieces[0]
                    merged[merged.count - 1] = last
                    continue
                }
            }
            merged.append(e)
        }
        return merged
    }

    /// Index of the extent containing `offset` in a region's sorted extents.
    static func find(_ extents: [ChainExtent], _ offset: UInt64) -> Int {
        var lo = 0, hi = extents.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if extents[mid].start <= offset { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }
}
