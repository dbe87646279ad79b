import Foundation
import Testing

/// A 1000-layer backing chain: every layer is a tiny qcow2 (4 KiB clusters) whose single
/// qemu-io call writes its own cluster, and every third layer also overwrites a cluster
/// of a lower layer, so that shadowing across the chain is checked too.
@Suite("1000-layer backing chain", .serialized)
struct DeepChainTests {
    static let layers = 1000
    static let cluster = 4096
    static let virtualSize = layers * cluster  // 4096000 bytes, a multiple of 512

    static func pattern(_ layer: Int) -> UInt8 { UInt8(layer % 251 + 1) }
    static func overwritePattern(_ layer: Int) -> UInt8 { UInt8((layer * 7) % 251 + 1) }

    /// Guest clusters written by `layer`, with their pattern byte, in write order.
    static func writes(_ layer: Int) -> [(cluster: Int, pattern: UInt8)] {
        var w = [(layer, pattern(layer))]
        if layer > 0 && layer % 3 == 0 { w.append((layer / 3, overwritePattern(layer))) }
        return w
    }

    /// The guest content of the top layer, computed from the known writes.
    static func expectedContent() -> Data {
        var bytes = [UInt8](repeating: 0, count: virtualSize)
        for layer in 0..<layers {
            for (c, p) in writes(layer) {
                for i in (c * cluster)..<((c + 1) * cluster) { bytes[i] = p }
            }
        }
        return Data(bytes)
    }

    /// One shell script: `qemu-img create` + one `qemu-io` per layer. Layers above 0 are created
    /// with `-u` and written with the backing file disabled (`"backing": null`): the writes are
    /// whole, aligned clusters, so no copy-on-write needs the backing data, and qemu-io does not
    /// have to open the whole chain below every layer.
    static func buildScript() -> String {
        var lines = ["set -e"]
        for layer in 0..<layers {
            let name = "layer\(layer).qcow2"
            if layer == 0 {
                lines.append("qemu-img create -q -f qcow2 -o cluster_size=4k \(name) \(virtualSize)")
            } else {
                lines.append("qemu-img create -q -f qcow2 -o cluster_size=4k -u -b layer\(layer - 1).qcow2 -F qcow2 \(name) \(virtualSize)")
            }
            let cmds = writes(layer).map { "-c 'write -q -P \($0.pattern) \($0.cluster * cluster) 4k'" }.joined(separator: " ")
            let spec = #"json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"\#(name)"}}"#
            lines.append("qemu-io \(cmds) '\(spec)' >/dev/null")
        }
        return lines.joined(separator: "\n") + "\n"
    }

    @Test("1000-layer chain reads correctly, also with ulimit -n 256", .timeLimit(.minutes(10)))
    func thousandLayers() async throws {
        try await withTempDir("deep-chain") { tmp in
            let imgDir = tmp + "/img", runDir = tmp + "/run", outDir = tmp + "/out"
            for d in [imgDir, runDir, outDir] { try mkdir(d) }
            try writeFile(tmp + "/build.sh", Data(Self.buildScript().utf8))
            let build = try await run("sh", [tmp + "/build.sh"], cwd: imgDir, timeout: 600)
            try #require(build.succeeded, "building the chain failed: \(build)")

            let top = "../img/layer\(Self.layers - 1).qcow2"
            let expected = Self.expectedContent()
            try writeFile(outDir + "/expected.raw", expected)

            // qemu-img is the judge when it manages the depth; else the computed content is.
            let qemuRaw = outDir + "/qemu.raw"
            let q = try await run("qemu-img", ["convert", "-O", "raw", top, qemuRaw], cwd: runDir, timeout: 300)
            if q.succeeded {
                let diff = try fileDifference(qemuRaw, outDir + "/expected.raw")
                #expect(diff == nil, "test bug: qemu-img's content differs from the computed one: \(diff ?? "")")
            }
            let reference = q.succeeded ? qemuRaw : outDir + "/expected.raw"

            let ours = try await qcow2(["convert", "-O", "raw", top, outDir + "/ours.raw"], cwd: runDir, timeout: 300)
            expectSuccess(ours)
            if ours.succeeded {
                let diff = try fileDifference(outDir + "/ours.raw", reference)
                #expect(diff == nil, "1000-layer chain: convert output differs: \(diff ?? "")")
            }

            // Same with few file descriptors (qemu-img itself cannot do this: it keeps every layer open).
            let limited = try await run(
                "sh", ["-c", #"ulimit -n 256; exec "$0" "$@""#, QCOW2Binary.path, "convert", "-O", "raw", top, outDir + "/ours-ulimit.raw"],
                cwd: runDir, timeout: 300)
            expectSuccess(limited)
            if limited.succeeded {
                let diff = try fileDifference(outDir + "/ours-ulimit.raw", reference)
                #expect(diff == nil, "1000-layer chain under ulimit -n 256: convert output differs: \(diff ?? "")")
            }

            // map and info --backing-chain against qemu-img when it can open the chain.
            let qmap = try await run("qemu-img", ["map", "--output=json", top], cwd: runDir, timeout: 300)
            if qmap.succeeded {
                let omap = try await qcow2(["map", "--output=json", top], cwd: runDir, timeout: 300)
                expectSuccess(omap)
                if omap.succeeded { try compareMap(ours: omap.stdout, qemu: qmap.stdout, context: "1000-layer chain") }
            }
            let qinfo = try await run("qemu-img", ["info", "--backing-chain", "--output=json", top], cwd: runDir, timeout: 300)
            if qinfo.succeeded {
                let oinfo = try await qcow2(["info", "--backing-chain", "--output=json", top], cwd: runDir, timeout: 300)
                expectSuccess(oinfo)
                if oinfo.succeeded {
                    try compareInfo(ours: oinfo.stdout, qemu: qinfo.stdout, chain: true, context: "1000-layer chain")
                }
            }
        }
    }
}
