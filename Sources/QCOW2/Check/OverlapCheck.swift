import QCOW2Format

/// QEMU's metadata overlap check (`qcow2_check_metadata_overlap`, default "cached" mode)
/// for the writes a repair makes: a write that would land on metadata other than the
/// structure being written is refused.
extension QCOW2Checker {
    enum MetadataKind: Int, CaseIterable {
        case header, activeL1, activeL2, refcountTable, refcountBlock, snapshotTable, inactiveL1, inactiveL2, bitmapDirectory

        /// QEMU's `metadata_ol_names`.
        var name: String {
            switch self {
            case .header: return "qcow2_header"
            case .activeL1: return "active L1 table"
            case .activeL2: return "active L2 table"
            case .refcountTable: return "refcount table"
            case .refcountBlock: return "refcount block"
            case .snapshotTable: return "snapshot table"
            case .inactiveL1: return "inactive L1 table"
            case .inactiveL2: return "inactive L2 table"
            case .bitmapDirectory: return "bitmap directory"
            }
        }
    }

    /// The first kind of metadata that `[offset, offset + size)` (widened to whole clusters)
    /// overlaps, other than `ignoring`; nil when the write is safe. Inactive L2 tables are
    /// not checked (as in QEMU's default mode), and neither are snapshot L1 tables the check
    /// found invalid (QEMU checks them and then refuses every write of the repair).
    func overlapCheck(ignoring: MetadataKind?, offset: UInt64, size: UInt64) -> MetadataKind? {
        guard size > 0 else { return nil }
        let start = offset & ~(clusterSize - 1)
        let end = (offset + size + clusterSize - 1) & ~(clusterSize - 1)
        func hits(_ o: UInt64, _ s: UInt64) -> Bool {
            guard s > 0 else { return false }
            let (e, overflow) = o.addingReportingOverflow(s)
            return o < end && (overflow || e > start)
        }
        for kind in MetadataKind.allCases where kind != ignoring {
            switch kind {
            case .header:
                if hits(0, clusterSize) { return kind }
            case .activeL1:
                if hits(header.l1TableOffset, UInt64(l1Size) * 8) { return kind }
            case .activeL2:
                for e in l1 where e & Self.l1OffsetMask != 0 {
                    if hits(e & Self.l1OffsetMask, clusterSize) { return kind }
                }
            case .refcountTable:
                if hits(reftableOffset, reftableSize * 8) { return kind }
            case .refcountBlock:
                for e in reftable where e & Self.reftableOffsetMask != 0 {
                    if hits(e & Self.reftableOffsetMask, clusterSize) { return kind }
                }
            case .snapshotTable:
                if hits(snapshotsOffset, snapshotsSize) { return kind }
            case .inactiveL1:
                for sn in snapshots where offsetInCluster(sn.l1TableOffset) == 0 && UInt64(sn.l1Size) <= QCOW2Limits.maxL1Entries {
                    if hits(sn.l1TableOffset, UInt64(sn.l1Size) * 8) { return kind }
                }
            case .inactiveL2:
                break
            case .bitmapDirectory:
                if header.autoclearFeatures.contains(.bitmaps), let b = image.bitmaps, b.count > 0,
                   hits(b.directoryOffset, b.directorySize) { return kind }
            }
        }
        return nil
    }

    /// What QEMU prints (and does: marks the image corrupt) when the overlap check refuses.
    func reportOverlap(_ kind: MetadataKind) {
        signalCorruption(fatal: true, "Preventing invalid write on metadata (overlaps with \(kind.name))")
    }
}
