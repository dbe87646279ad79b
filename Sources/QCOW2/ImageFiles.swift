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
        guard let image = layer.header, image.header.nbSnapshots > 0 else { return [] }
        return try SnapshotTable.read(file: try FileHandle(path: layer.path, writable: false), image: image, path: layer.path)
    }
}

/// Reading the internal snapshot table (format doc §8) with QEMU's limits.
enum SnapshotTable {
    static func read(file: FileHandle, image: ImageHeader, path: String) throws -> [SnapshotTableEntry] {
        let h = image.header
        guard h.nbSnapshots > 0 else { return [] }
        let size = try file.size()
        guard h.snapshotsOffset < size else {
            throw QCOW2Error.corrupt(path: path, "snapshot table offset 0x\(String(h.snapshotsOffset, radix: 16)) is beyond the end of the file")
        }
        // The table's length is known only by parsing it; it is at most 64 MiB (QEMU's limit).
        let count = Int(min(size - h.snapshotsOffset, QCOW2Limits.maxSnapshotTableBytes))
        let bytes = try file.read(count: count, at: h.snapshotsOffset)
        do {
            return try SnapshotTableEntry.parseTable(bytes, count: Int(h.nbSnapshots), clusterSize: UInt64(h.clusterSize))
        } catch {
            throw QCOW2Error.format(path: path, error)
        }
    }

    /// QEMU's `find_snapshot_by_id_or_name`: an ID match first, then a name match (bytes,
    /// as its `strcmp`: a stored name that is not UTF-8 never equals a decoded copy of it).
    static func find(_ key: String, in table: [SnapshotTableEntry]) -> SnapshotTableEntry? {
        table.first { $0.hasID(key) } ?? table.first { $0.hasName(key) }
    }

    /// qemu-img's `-l snapshot.id=ID,snapshot.name=NAME`: every given part must match.
    static func find(id: String?, name: String?, in table: [SnapshotTableEntry]) -> SnapshotTableEntry? {
        table.first { s in (id.map { s.hasID($0) } ?? true) && (name.map { s.hasName($0) } ?? true) }
    }
}
