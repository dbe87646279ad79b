// libFuzzer target: SnapshotTableEntry.parseTable on fuzzed bytes.
// Input: bytes 0–1 → entry count (0…65535; the header limits it to 65536), byte 2 →
// cluster_bits (9…21), then the table. A parsed table is serialized again (the engine
// rewrites the table on snapshot create/delete) and must parse back to as many entries
// with the same L1 offsets/sizes, ids and names.
import QCOW2Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 3 else { return 0 }
    let count = Int(data[0]) << 8 | Int(data[1])
    let clusterSize = UInt64(1) << UInt64(9 + Int(data[2]) % 13)
    let table = Array(UnsafeBufferPointer(start: data + 3, count: size - 3))
    guard let entries = try? SnapshotTableEntry.parseTable(table, count: count, clusterSize: clusterSize) else { return 0 }
    precondition(entries.count == count)
    let bytes = SnapshotTableEntry.serializeTable(entries)
    guard let again = try? SnapshotTableEntry.parseTable(bytes, count: entries.count, clusterSize: clusterSize) else {
        fatalError("a serialized snapshot table does not parse again")
    }
    for (a, b) in zip(entries, again) {
        guard a.l1TableOffset == b.l1TableOffset, a.l1Size == b.l1Size, a.idBytes == b.idBytes, a.nameBytes == b.nameBytes,
              a.vmStateSize == b.vmStateSize, a.unknownExtraData == b.unknownExtraData else {
            fatalError("snapshot entry changed in a round trip: \(a) → \(b)")
        }
    }
    return 0
}
