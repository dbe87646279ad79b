import QCOW2Format

/// File-level facts about images that are not part of reading guest data.
public enum ImageFiles {
    /// Bytes the file occupies on disk (qemu-img's `actual-size`), including an external
    /// data file when the image has one.
    public static func allocatedSize(path: String) throws -> UInt64 {
        try FileHandle(path: path, writable: false).allocatedSize()
    }

    /// The internal snapshot table of a qcow2 layer (empty for raw layers).
    public static func snapshots(of layer: LayerInfo) throws -> [SnapshotTableEntry] {
        guard let h = layer.header?.header, h.nbSnapshots > 0 else { return [] }
        let file = try FileHandle(path: layer.path, writable: false)
        let size = try file.size()
        guard h.snapshotsOffset < size else {
            throw QCOW2Error.corrupt(path: layer.path, "snapshot table offset 0x\(String(h.snapshotsOffset, radix: 16)) is beyond the end of the file")
        }
        // The table's length is known only by parsing it; it is at most 64 MiB (QEMU's limit).
        let count = Int(min(size - h.snapshotsOffset, QCOW2Limits.maxSnapshotTableBytes))
        let bytes = try file.read(count: count, at: h.snapshotsOffset)
        do {
            return try SnapshotTableEntry.parseTable(bytes, count: Int(h.nbSnapshots), clusterSize: UInt64(h.clusterSize))
        } catch {
            throw QCOW2Error.format(path: layer.path, error)
        }
    }
}
