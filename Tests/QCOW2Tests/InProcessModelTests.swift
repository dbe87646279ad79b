import Foundation
import QCOW2
import Testing

/// Random writes, zero writes and discards through one open `DiskImage`, with every read
/// checked against an in-memory model right away (catches stale chain-index state that a
/// reopen would hide), then qemu-img check and compare at the end.
@Suite("In-process reads after writes match a model")
struct InProcessModelTests {
    @Test("random operations, reads checked after each", arguments: [
        ("", true), ("", false), ("cluster_size=4k", true), ("extended_l2=on", true), ("compat=0.10", true), ("cluster_size=512", false),
    ])
    func randomOperations(_ options: String, _ withBacking: Bool) async throws {
        try await withTempDir("inproc") { dir in
            let size = 8 << 20
            var model = [UInt8](repeating: 0, count: size)
            let opts = options.isEmpty ? [] : ["-o", options]
            if withBacking {
                _ = try await qemuImg(["create", "-q", "-f", "qcow2"] + opts + ["base.qcow2", String(size)], cwd: dir)
                try await qemuIO(dir + "/base.qcow2", ["write -P 0x77 0 6M"], cwd: dir)
                for i in 0..<(6 << 20) { model[i] = 0x77 }
                _ = try await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"] + opts + ["top.qcow2"], cwd: dir)
            } else {
                _ = try await qemuImg(["create", "-q", "-f", "qcow2"] + opts + ["top.qcow2", String(size)], cwd: dir)
            }
            let v3 = !options.contains("0.10")
            let disk = try DiskImage.open(path: dir + "/top.qcow2", options: OpenOptions(writable: true))
            let cs = Int(disk.clusterSize)
            var rng = WSplitMix64(seed: UInt64(options.count * 7 + (withBacking ? 1 : 0)))
            var buffer = [UInt8](repeating: 0, count: 300_000)
            for step in 0..<150 {
                let length = Int(rng.next() % 200_000) + 1
                let offset = Int(rng.next() % UInt64(size - length))
                switch rng.next() % 6 {
                case 0, 1, 2:
                    let p = UInt8(truncatingIfNeeded: rng.next() | 1)
                    for i in 0..<length { buffer[i] = p }
                    try buffer.withUnsafeBytes { try disk.write(at: UInt64(offset), from: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
                    for i in offset..<(offset + length) { model[i] = p }
                case 3:
                    try disk.writeZeroes(at: UInt64(offset), length: UInt64(length), unmap: rng.next() % 2 == 0)
                    for i in offset..<(offset + length) { model[i] = 0 }
                case 4:
                    try disk.discard(at: UInt64(offset), length: UInt64(length))
                    // Whole clusters inside the range read as zeros (v3); v2 with a backing
                    // file ignores discards; v2 without one makes them unallocated (zeros).
                    if v3 || !withBacking {
                        let first = (offset + cs - 1) / cs * cs, last = (offset + length) / cs * cs
                        if first < last { for i in first..<last { model[i] = 0 } }
                    }
                default:
                    try disk.flush()
                }
                // Check the touched range and a random one.
                for (o, l) in [(offset, length), (Int(rng.next() % UInt64(size - 70_000)), 70_000)] {
                    try buffer.withUnsafeMutableBytes { try disk.read(at: UInt64(o), into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<l])) }
                    if let i = (0..<l).first(where: { buffer[$0] != model[o + $0] }) {
                        Issue.record("[\(options) backing=\(withBacking)] step \(step): byte \(o + i) reads \(buffer[i]), expected \(model[o + i])")
                        try disk.close()
                        return
                    }
                }
            }
            try disk.close()
            let check = try await run("qemu-img", ["check", "top.qcow2"], cwd: dir, timeout: 60)
            #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)")
            try Data(model).write(to: URL(fileURLWithPath: dir + "/model.raw"))
            let cmp = try await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "model.raw"], cwd: dir, timeout: 60)
            #expect(cmp.status == 0, "qemu-img compare with the model: \(cmp.stdout)")
        }
    }
}
