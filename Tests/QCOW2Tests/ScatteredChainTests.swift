import Foundation
import Testing

/// A chain whose clusters are scattered over many layers, so that the chain index's
/// pending set fragments and it switches to the per-cluster bitmap (PendingClusters),
/// mixed with every layer kind that must make it fall back to ranges: a different cluster
/// size, extended L2 with subclusters, a shorter layer, compressed and zero clusters,
/// and a raw base. `map` and `convert` must agree with qemu-img exactly.
@Suite("Scattered chain: bitmap resolution vs qemu-img")
struct ScatteredChainTests {
    static let virtualSize = 8 * 1024 * 1024 + 4096
    static let layers = 24

    /// Layer options: cluster size, extended L2 and size vary on a few layers.
    static func createOptions(_ layer: Int) -> (options: String, size: Int) {
        switch layer {
        case 5: return ("cluster_size=65536", virtualSize)
        case 9: return ("cluster_size=16384,extended_l2=on", virtualSize)
        case 12: return ("cluster_size=4096", 6 * 1024 * 1024)
        case 15: return ("cluster_size=4096,compression_type=zstd", virtualSize)
        default: return ("cluster_size=4096", virtualSize)
        }
    }

    /// qemu-io commands for `layer`: scattered 4 KiB clusters, plus some zero writes,
    /// compressed writes, subcluster writes and discards on the special layers.
    static func commands(_ layer: Int, size: Int) -> [String] {
        var rng = WSplitMix64(seed: UInt64(layer) &* 0x9E37_79B9 &+ 17)
        let clusters = size / 4096
        var cmds: [String] = []
        if layer == 15 {
            // Compressed writes first, each to its own cluster (qemu-io cannot compress
            // over an allocated cluster).
            var seen = Set<Int>()
            for _ in 0..<8 {
                let c = Int(rng.next() % UInt64(clusters))
                if seen.insert(c).inserted { cmds.append("write -q -c -P 0x\(String(layer + 100, radix: 16)) \(c * 4096) 4096") }
            }
        }
        for _ in 0..<40 {
            let c = Int(rng.next() % UInt64(clusters))
            cmds.append("write -q -P \(layer + 1) \(c * 4096) 4096")
        }
        if layer % 4 == 3 {
            for _ in 0..<8 { cmds.append("write -q -z \(Int(rng.next() % UInt64(clusters)) * 4096) 4096") }
        }
        if layer == 9 {
            // Subclusters of 512 bytes: partial writes leave the rest of the cluster to lower layers.
            for _ in 0..<8 { cmds.append("write -q -P 0x99 \(Int(rng.next() % UInt64(clusters)) * 4096 + 512) 1024") }
        }
        return cmds
    }

    @Test("map and convert agree with qemu-img on a scattered chain")
    func scatteredChain() async throws {
        try await withTempDir("scattered") { dir in
            // Raw base with a pattern every 64 KiB.
            var base = [UInt8](repeating: 0, count: Self.virtualSize)
            for off in stride(from: 0, to: Self.virtualSize, by: 65536) { base[off] = 0xBB }
            try writeFile(dir + "/base.raw", Data(base))
            var below = ("base.raw", "raw")
            for layer in 0..<Self.layers {
                let name = "l\(layer).qcow2"
                let (options, size) = Self.createOptions(layer)
                _ = try await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "-b", below.0, "-F", below.1, name, String(size)], cwd: dir)
                // Write without opening the chain below: no copy-on-write is needed for the
                // whole-cluster writes, and partial writes then leave subclusters unallocated.
                let spec = #"json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"\#(name)"}}"#
                let cmds = Self.commands(layer, size: size).flatMap { ["-c", $0] }
                let r = try await run("qemu-io", cmds + [spec], cwd: dir, timeout: 120)
                #expect(r.succeeded, "qemu-io on layer \(layer): \(r)")
                below = (name, "qcow2")
            }
            let top = below.0
            let ours = try await qcow2(["map", "--output=json", top], cwd: dir, timeout: 60)
            let qemu = try await qemuImg(["map", "--output=json", top], cwd: dir)
            #expect(ours.succeeded, "\(ours)")
            if ours.succeeded { try compareMap(ours: ours.stdout, qemu: qemu, context: "scattered chain") }
            let oc = try await qcow2(["convert", "-O", "raw", top, "ours.raw"], cwd: dir, timeout: 60)
            #expect(oc.succeeded, "\(oc)")
            _ = try await qemuImg(["convert", "-O", "raw", top, "qemu.raw"], cwd: dir)
            #expect(try fileDifference(dir + "/ours.raw", dir + "/qemu.raw") == nil)
        }
    }
}
