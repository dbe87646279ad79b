/// The clusters of a region that no layer has claimed yet, one bit per cluster.
///
/// The chain index starts resolving a region with a list of pending ranges. Deep in a
/// chain whose clusters are spread over many layers, that list fragments into thousands
/// of ranges, and walking all of them once per layer made the first read of a region at
/// depth 500 cost 100+ ms. As a bitmap, a layer costs one scan of its L2 entries for the
/// pending clusters (a few microseconds for 8192 entries) plus the work for the clusters
/// it actually holds. Used only while the layers share one cluster size and ranges are
/// cluster-aligned; otherwise the index falls back to ranges (`ranges()`).
struct PendingClusters {
    /// Guest offset of bit 0 (cluster-aligned) and the end of the range (may be unaligned
    /// at the end of the disk).
    let start: UInt64
    let end: UInt64
    let clusterBits: UInt32
    /// Bit `c & 63` of word `c >> 6` is set while cluster `c` is pending.
    var words: [UInt64]
    let count: Int

    var clusterSize: UInt64 { 1 << UInt64(clusterBits) }

    /// Bitmap of `ranges` (sorted, inside `[start, end)`), or nil if a range does not start
    /// and end on cluster boundaries (the disk's end counts as one).
    init?(ranges: [Range<UInt64>], start: UInt64, end: UInt64, clusterBits: UInt32) {
        let cs = UInt64(1) << UInt64(clusterBits)
        guard start & (cs - 1) == 0, end > start else { return nil }
        let n = (end - start + cs - 1) >> UInt64(clusterBits)
        guard n <= 1 << 20 else { return nil }
        self.start = start
        self.end = end
        self.clusterBits = clusterBits
        count = Int(n)
        words = [UInt64](repeating: 0, count: (count + 63) / 64)
        for r in ranges {
            guard r.lowerBound >= start, r.upperBound <= end, r.lowerBound & (cs - 1) == 0,
                  r.upperBound & (cs - 1) == 0 || r.upperBound == end
            else { return nil }
            let first = Int((r.lowerBound - start) >> UInt64(clusterBits))
            let last = Int((r.upperBound - start + cs - 1) >> UInt64(clusterBits))
            for c in first..<last { words[c >> 6] |= 1 << UInt64(c & 63) }
        }
    }

    var isEmpty: Bool { !words.contains { $0 != 0 } }

    /// Calls `body` with each pending cluster index in `first..<last`, in order.
    func forEach(in first: Int, _ last: Int, _ body: (Int) throws -> Void) rethrows {
        guard first < last else { return }
        for w in (first >> 6)...((last - 1) >> 6) {
            var bits = words[w]
            while bits != 0 {
                let c = w << 6 + bits.trailingZeroBitCount
                bits &= bits - 1
                if c < first { continue }
                if c >= last { return }
                try body(c)
            }
        }
    }

    /// First and last pending cluster in `first..<last`, if any (word by word).
    func bounds(in first: Int, _ last: Int) -> (Int, Int)? {
        guard first < last else { return nil }
        let fw = first >> 6, lw = (last - 1) >> 6
        func masked(_ w: Int) -> UInt64 {
            var bits = words[w]
            if w == fw { bits &= ~0 << UInt64(first & 63) }
            if w == lw, (last - 1) & 63 < 63 { bits &= (1 << UInt64((last - 1) & 63 + 1)) - 1 }
            return bits
        }
        guard let lo = (fw...lw).first(where: { masked($0) != 0 }) else { return nil }
        let hi = (lo...lw).last(where: { masked($0) != 0 }) ?? lo
        return (lo << 6 + masked(lo).trailingZeroBitCount, hi << 6 + 63 - masked(hi).leadingZeroBitCount)
    }

    /// Guest offset of cluster `c`, and the end of its range (clamped to `end`).
    func guestRange(_ c: Int) -> (UInt64, UInt64) {
        let s = start + UInt64(c) << UInt64(clusterBits)
        return (s, min(end, s + clusterSize))
    }

    /// The pending clusters as sorted, merged guest ranges.
    func ranges() -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        forEach(in: 0, count) { c in
            let (s, e) = guestRange(c)
            if let last = out.last, last.upperBound == s {
                out[out.count - 1] = last.lowerBound..<e
            } else {
                out.append(s..<e)
            }
        }
        return out
    }
}
