// libFuzzer target: L2 entry decoding with fuzzed geometry.
// Input: byte 0 → cluster_bits (9…21), byte 1 → flags (extended L2 when cluster_bits ≥ 14,
// version 2/3, external data file), then 16-byte records (L2 entry, subcluster bitmap).
// Checks: no trap; a compressed descriptor re-encodes to the same descriptor bits; every
// subcluster type is decodable.
import QCOW2Format

@inline(__always) func be64(_ p: UnsafePointer<UInt8>) -> UInt64 {
    var v: UInt64 = 0
    for i in 0..<8 { v = v << 8 | UInt64(p[i]) }
    return v
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 2 else { return 0 }
    let clusterBits = UInt32(9 + Int(data[0]) % 13)
    let flags = data[1]
    let extended = flags & 1 != 0 && clusterBits >= QCOW2Limits.minClusterBitsExtendedL2
    let version: UInt32 = flags & 2 != 0 ? 2 : 3
    let external = flags & 4 != 0
    let geometry = ClusterGeometry(clusterBits: clusterBits, extendedL2: extended)
    var p = 2
    while p + 16 <= size {
        let raw = be64(data + p), bitmap = be64(data + p + 8)
        p += 16
        let entry = L2Entry(rawValue: raw, bitmap: extended ? bitmap : 0)
        _ = entry.hasReservedBits
        _ = geometry.l1Index(bitmap)
        _ = geometry.l2Index(bitmap)
        _ = geometry.offsetInCluster(raw)
        _ = geometry.l1EntriesNeeded(forVirtualSize: bitmap)
        _ = L1Entry(rawValue: raw).l2Offset
        _ = RefcountTableEntry(rawValue: raw).blockOffset
        if let kind = try? entry.clusterKind(geometry: geometry, version: version, externalData: external) {
            if extended {
                for i in 0..<QCOW2Limits.subclustersPerCluster { _ = entry.subclusterType(i, kind: kind) }
            }
            if case let .compressed(d) = kind {
                let bits = CompressedDescriptor.encode(hostOffset: d.hostOffset, length: d.compressedSize, clusterBits: clusterBits)
                guard bits == raw & ((1 << 62) - 1) else {
                    fatalError("compressed descriptor 0x\(String(raw, radix: 16)) (cluster_bits \(clusterBits)) re-encodes as 0x\(String(bits, radix: 16))")
                }
            }
        }
        if raw & L2Entry.compressedFlag != 0 {
            _ = try? CompressedDescriptor(l2Entry: raw, clusterBits: clusterBits)
        }
    }
    return 0
}
