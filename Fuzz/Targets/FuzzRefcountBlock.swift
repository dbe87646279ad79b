// libFuzzer target: RefcountBlockCodec get/set on a fuzzed refcount block.
// Input: byte 0 → refcount_order (0…6), byte 1 → cluster_bits (9…16), byte 2 → number of
// operations, then 12-byte operations (index u32, value u64), then the block's bytes.
// Checks: set(i, v) then get(i) == v & maxValue; neighbours unchanged; get never traps.
import QCOW2Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size >= 3 else { return 0 }
    let codec = RefcountBlockCodec(order: UInt32(data[0] % 7))
    let clusterSize = 1 << (9 + Int(data[1]) % 8)
    let opCount = Int(data[2])
    let opsEnd = min(size, 3 + opCount * 12)
    var block = [UInt8](repeating: 0, count: clusterSize)
    if opsEnd < size {
        for i in 0..<min(clusterSize, size - opsEnd) { block[i] = data[opsEnd + i] }
    }
    let entries = codec.entries(clusterSize: clusterSize)
    precondition(entries > 0)
    block.withUnsafeMutableBytes { raw in
        let ro = UnsafeRawBufferPointer(raw)
        // Decode every entry.
        var sum: UInt64 = 0
        for i in 0..<entries { sum &+= codec.get(ro, i) }
        _ = sum
        var p = 3
        while p + 12 <= opsEnd {
            var index = 0
            for k in 0..<4 { index = index << 8 | Int(data[p + k]) }
            var value: UInt64 = 0
            for k in 0..<8 { value = value << 8 | UInt64(data[p + 4 + k]) }
            p += 12
            let i = index % entries
            let before = i > 0 ? codec.get(ro, i - 1) : nil
            let after = i + 1 < entries ? codec.get(ro, i + 1) : nil
            let v = value & codec.maxValue
            codec.set(raw, i, v)
            guard codec.get(ro, i) == v else { fatalError("refcount order \(codec.order): set(\(i), \(v)) then get → \(codec.get(ro, i))") }
            guard before == (i > 0 ? codec.get(ro, i - 1) : nil), after == (i + 1 < entries ? codec.get(ro, i + 1) : nil) else {
                fatalError("refcount order \(codec.order): set(\(i), \(v)) changed a neighbour")
            }
        }
    }
    return 0
}
