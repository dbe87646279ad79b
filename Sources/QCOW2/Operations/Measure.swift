import QCOW2Format

/// Space needed by a new image, as `qemu-img measure` computes it (QEMU's `qcow2_measure`
/// and `qcow2_calc_prealloc_size`).
public enum Measure {
    public struct Result: Sendable, Equatable {
        /// Bytes needed for the image as converted (metadata for a fully allocated image plus the data clusters in use).
        public var required: UInt64
        /// Bytes for a fully allocated image of this size.
        public var fullyAllocated: UInt64
    }

    /// - Parameters:
    ///   - source: the image to convert (nil: an empty image of `size` bytes).
    ///   - format: "qcow2" or "raw".
    ///   - options: cluster size, refcount width, extended L2, preallocation, backing file.
    public static func measure(source: (any BlockDevice)?, size: UInt64?, format: String, options: CreateOptions) throws -> Result {
        let rawSize = source?.virtualSize ?? size ?? 0
        if format == "raw" {
            let r = (rawSize + 511) & ~511
            return Result(required: r, fullyAllocated: r)
        }
        guard format == "qcow2" else { throw QCOW2Error.invalidArgument("unknown format '\(format)'") }
        // The same limits as create (cluster size, refcount width, compat rules, size).
        var check = options
        check.size = rawSize
        _ = try check.validated(requireBackingFormat: false)
        let cs = options.clusterSize
        guard cs.nonzeroBitCount == 1, cs >= 512, cs <= 2 << 20 else {
            throw QCOW2Error.invalidArgument("Cluster size must be a power of two between 512 and 2048k")
        }
        let (padded, overflow) = rawSize.addingReportingOverflow(cs - 1)
        guard !overflow else { throw QCOW2Error.invalidArgument("Image size is too large") }
        let virtualSize = padded & ~(cs - 1)
        var required: UInt64 = 0
        if let source {
            if options.backingFile != nil {
                required = virtualSize
            } else {
                required = try dataClusters(source: source, clusterSize: cs)
            }
        }
        if options.preallocation == "full" || options.preallocation == "falloc" { required = virtualSize }
        let full = preallocatedSize(virtualSize, clusterSize: cs, refcountOrder: UInt32(options.refcountBits.trailingZeroBitCount),
                                    extendedL2: options.extendedL2)
        return Result(required: full - virtualSize + required, fullyAllocated: full)
    }

    /// Bytes of the clusters (of the new image) that hold data, each cluster counted once.
    private static func dataClusters(source: any BlockDevice, clusterSize cs: UInt64) throws -> UInt64 {
        var total: UInt64 = 0
        var next: UInt64 = 0  // first cluster not counted yet
        for e in try source.allocationMap(offset: 0, length: source.virtualSize) where e.data && e.present && !e.zero {
            let first = max(e.start / cs, next), last = (e.end - 1) / cs
            if first <= last { total += (last - first + 1) * cs }
            next = max(next, last + 1)
        }
        return total
    }

    /// QEMU's `qcow2_calc_prealloc_size`: header, L2 tables, L1 table and refcount
    /// structures for a fully allocated image, plus the data.
    public static func preallocatedSize(_ total: UInt64, clusterSize cs: UInt64, refcountOrder: UInt32, extendedL2: Bool) -> UInt64 {
        let aligned = (total + cs - 1) / cs * cs
        let l2eSize: UInt64 = extendedL2 ? 16 : 8
        var meta = cs
        var nl2e = aligned / cs
        nl2e = (nl2e + cs / l2eSize - 1) / (cs / l2eSize) * (cs / l2eSize)
        meta += nl2e * l2eSize
        var nl1e = nl2e * l2eSize / cs
        nl1e = (nl1e + cs / 8 - 1) / (cs / 8) * (cs / 8)
        meta += nl1e * 8
        meta += refcountMetadataSize(clusters: (meta + aligned) / cs, clusterSize: cs, refcountOrder: refcountOrder)
        return meta + aligned
    }

    /// QEMU's `qcow2_refcount_metadata_size` (without the generous increase).
    static func refcountMetadataSize(clusters: UInt64, clusterSize cs: UInt64, refcountOrder: UInt32) -> UInt64 {
        let perTableCluster = cs / 8
        let perBlock = cs * 8 / (UInt64(1) << UInt64(refcountOrder))
        var table: UInt64 = 0, blocks: UInt64 = 0, n: UInt64 = 0, last: UInt64
        repeat {
            last = n
            blocks = (clusters + table + blocks + perBlock - 1) / perBlock
            table = (blocks + perTableCluster - 1) / perTableCluster
            n = clusters + blocks + table
        } while n != last
        return (blocks + table) * cs
    }
}
