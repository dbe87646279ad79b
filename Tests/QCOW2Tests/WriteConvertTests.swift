import Foundation
import Testing

/// Options of `qcow2 convert -O qcow2` in the raw → qcow2 → raw round trip.
struct WConvertOptions: Sendable, CustomTestStringConvertible {
    var name: String
    var args: [String]
    var compressed = false
    var testDescription: String { name }

    static let all: [WConvertOptions] = [
        .init(name: "plain", args: []),
        .init(name: "-c", args: ["-c"], compressed: true),
        .init(name: "-c -o compression_type=zstd", args: ["-c", "-o", "compression_type=zstd"], compressed: true),
        .init(name: "-o cluster_size=4k,extended_l2=off", args: ["-o", "cluster_size=4k,extended_l2=off"]),
        .init(name: "-o extended_l2=on", args: ["-o", "extended_l2=on"]),
        .init(name: "-o compat=0.10", args: ["-o", "compat=0.10"]),
        .init(name: "-c -o cluster_size=512", args: ["-c", "-o", "cluster_size=512"], compressed: true),
        .init(name: "-o refcount_bits=1,cluster_size=2M", args: ["-o", "refcount_bits=1,cluster_size=2M"]),
        .init(name: "-m 1 -S 0", args: ["-m", "1", "-S", "0"]),
    ]
}

@Suite("Write: convert round trips")
struct WriteConvertTests {
    /// 6 MiB + 1.5 KiB: a sector multiple but not a cluster multiple (a partial last cluster).
    static let rawSize = (6 << 20) + 1536

    @Test("raw → qcow2 convert → raw is byte-identical", arguments: WConvertOptions.all)
    func rawRoundTrip(_ opts: WConvertOptions) async throws {
        try await withTempDir("conv-" + opts.name) { dir in
            let original = wRoundTripData(size: Self.rawSize, seed: 0xC0FFEE)
            try writeFile(dir + "/src.raw", original)

            let conv = try await qcow2(["convert", "-f", "raw", "-O", "qcow2"] + opts.args + ["src.raw", "out.qcow2"], cwd: dir, timeout: 120)
            expectSuccess(conv)
            try #require(conv.succeeded)
            let report = try await wExpectCleanCheck("out.qcow2", cwd: dir, context: opts.name)

            // The qcow2 holds the same data, as qemu reads it.
            let viaQemu = try await wQemuRawBytes("out.qcow2", scratch: dir + "/qemu.raw", cwd: dir)
            let firstDiff = wFirstDifference(viaQemu, [UInt8](original)).map(String.init) ?? "-"
            #expect(Data(viaQemu) == original,
                    "qemu-img convert -O raw of our qcow2 differs from the original: \(viaQemu.count) vs \(original.count) bytes, first difference at \(firstDiff)")
            try await wExpectIdentical("out.qcow2", "src.raw", formatB: "raw", cwd: dir, context: opts.name)

            // And back to raw with our converter.
            let back = try await qcow2(["convert", "-O", "raw", "out.qcow2", "back.raw"], cwd: dir, timeout: 120)
            expectSuccess(back)
            if back.succeeded {
                let diff = try fileDifference(dir + "/back.raw", dir + "/src.raw")
                #expect(diff == nil, "round trip is not byte-identical: \(diff ?? "")")
            }

            // The options took effect, as qemu-img sees them.
            let info = try #require(try parseJSON(try await qemuImg(["info", "--output=json", "out.qcow2"], cwd: dir), "info") as? [String: Any])
            let data = ((info["format-specific"] as? [String: Any])?["data"] as? [String: Any]) ?? [:]
            let optionString = opts.args.firstIndex(of: "-o").map { opts.args[$0 + 1] } ?? ""
            if optionString.contains("zstd") { #expect(data["compression-type"] as? String == "zstd", "compression type: \(data)") }
            if optionString.contains("cluster_size=4k") { #expect((info["cluster-size"] as? NSNumber)?.intValue == 4096) }
            if optionString.contains("cluster_size=512") { #expect((info["cluster-size"] as? NSNumber)?.intValue == 512) }
            if optionString.contains("cluster_size=2M") { #expect((info["cluster-size"] as? NSNumber)?.intValue == 2 << 20) }
            if optionString.contains("extended_l2=on") { #expect(data["extended-l2"] as? Bool == true) }
            if optionString.contains("compat=0.10") { #expect(data["compat"] as? String == "0.10") }
            if optionString.contains("refcount_bits=1") { #expect((data["refcount-bits"] as? NSNumber)?.intValue == 1) }
            #expect((info["virtual-size"] as? NSNumber)?.intValue == Self.rawSize)
            if opts.compressed, let report {
                let n = (report["compressed-clusters"] as? NSNumber)?.intValue ?? 0
                #expect(n > 0, "-c produced no compressed clusters: \(canonicalJSON(report))")
            }
        }
    }

    @Test("-B: a chain converted against its base", arguments: [2, 3])
    func backingDifference(layers: Int) async throws {
        try await withTempDir("conv-B-\(layers)") { dir in
            let b = ImageBuilder(dir: dir)
            let size = 4 << 20
            try await b.create("base.qcow2", size: String(size))
            try await b.io("base.qcow2", ["write -P 0xb1 0 3M", "write -P 0xb2 3M 512k"])
            var top = "base.qcow2"
            for layer in 1..<layers {
                let name = "layer\(layer).qcow2"
                try await b.create(name, size: String(size), backing: top)
                try await b.io(name, [
                    "write -P 0x\(String(0x10 + layer, radix: 16)) \(layer * 100_000) 200000",
                    "write -z \(layer * 1_000_000) 131072",            // zeros over base data
                    "write -z -u \(layer * 1_500_000 / 65536 * 65536) 65536",
                    "discard \(2 << 20) 131072",                        // discard over base data
                    "write -P 0x\(String(0x20 + layer, radix: 16)) \(size - 70000) 70000",
                    "write -c -P 0x\(String(0x30 + layer, radix: 16)) \(layer * 128 << 10 + 2 << 20) 65536",
                ])
                top = name
            }
            let conv = try await qcow2(["convert", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", top, "new.qcow2"], cwd: dir, timeout: 120)
            expectSuccess(conv)
            try #require(conv.succeeded)
            try await wExpectIdentical(top, "new.qcow2", cwd: dir, context: "-B with \(layers) layers")
            try await wExpectCleanCheck("new.qcow2", cwd: dir, context: "-B with \(layers) layers")
            let info = try #require(try parseJSON(try await qemuImg(["info", "--output=json", "new.qcow2"], cwd: dir), "info") as? [String: Any])
            #expect(info["backing-filename"] as? String == "base.qcow2", "backing of the output: \(canonicalJSON(info))")
            #expect(info["backing-filename-format"] as? String == "qcow2", "backing format of the output: \(canonicalJSON(info))")
            // The output must not copy the base: it may only hold what the layers above the
            // base hold (qemu-img convert -B is no judge here: it only looks at the top layer,
            // assuming -B names the source's own backing file).
            let source = try wNormalizedMap(try await qemuImg(["map", "--output=json", top], cwd: dir))
            let output = try wNormalizedMap(try await qemuImg(["map", "--output=json", "new.qcow2"], cwd: dir))
            let aboveBase = source.filter { $0.present && $0.depth < layers - 1 }.reduce(0) { $0 + $1.length }
            let outputTop = output.filter { $0.present && $0.depth == 0 }.reduce(0) { $0 + $1.length }
            #expect(outputTop <= aboveBase,
                    "our -B output allocates \(outputTop) bytes, the layers above the base only \(aboveBase)\nsource: \(source)\noutput: \(output)")
        }
    }

    @Test("several sources are concatenated like qemu-img convert", arguments: ["qcow2", "raw"])
    func multipleSources(format: String) async throws {
        try await withTempDir("conv-multi-\(format)") { dir in
            let b = ImageBuilder(dir: dir)
            try b.write("one.raw", wRoundTripData(size: (1 << 20) + 512, seed: 1))
            try await b.create("two.qcow2", size: "3M", options: "cluster_size=4k")
            try await b.io("two.qcow2", ["write -P 0x22 0 100000", "write -z 1M 1M", "write -c -P 0x23 2M 8k", "write -P 0x24 3000000 145728"])
            try await b.create("three-base.qcow2", size: "2M")
            try await b.io("three-base.qcow2", ["write -P 0x31 0 2M"])
            try await b.create("three.qcow2", size: "2M", backing: "three-base.qcow2")
            try await b.io("three.qcow2", ["write -P 0x33 512k 4096", "write -z 1M 64k"])
            try b.write("four.raw", wRoundTripData(size: 70 * 512, seed: 4))
            let sources = ["one.raw", "two.qcow2", "three.qcow2", "four.raw"]

            try await qemuImg(["convert", "-O", format] + sources + ["qemu.out"], cwd: dir)
            let conv = try await qcow2(["convert", "-O", format] + sources + ["ours.out"], cwd: dir, timeout: 120)
            expectSuccess(conv)
            try #require(conv.succeeded)
            try await wExpectIdentical("ours.out", "qemu.out", formatA: format, formatB: format, cwd: dir, context: "concatenation")
            if format == "raw" {
                let diff = try fileDifference(dir + "/ours.out", dir + "/qemu.out")
                #expect(diff == nil, "raw concatenation differs from qemu-img's: \(diff ?? "")")
            } else {
                try await wExpectCleanCheck("ours.out", cwd: dir, context: "concatenation")
                let qi = try #require(try parseJSON(try await qemuImg(["info", "--output=json", "qemu.out"], cwd: dir), "info") as? [String: Any])
                let oi = try #require(try parseJSON(try await qemuImg(["info", "--output=json", "ours.out"], cwd: dir), "info") as? [String: Any])
                #expect(canonicalJSON(oi["virtual-size"] ?? 0) == canonicalJSON(qi["virtual-size"] ?? 0))
            }
        }
    }

    @Test("-n writes into an existing image; a chain flattens")
    func existingTargetAndFlatten() async throws {
        try await withTempDir("conv-n") { dir in
            let b = ImageBuilder(dir: dir)
            try await b.create("base.qcow2", size: "3M", options: "cluster_size=16k")
            try await b.io("base.qcow2", ["write -P 0x41 0 3M", "write -z 1M 100k"])
            try await b.create("top.qcow2", size: "3M", backing: "base.qcow2")
            try await b.io("top.qcow2", ["write -P 0x42 10000 20000", "discard 2M 64k", "write -z -u 2500000 300000"])

            // Flatten the chain into a standalone qcow2.
            let flat = try await qcow2(["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"], cwd: dir, timeout: 120)
            expectSuccess(flat)
            if flat.succeeded {
                try await wExpectIdentical("top.qcow2", "flat.qcow2", cwd: dir, context: "flatten")
                try await wExpectCleanCheck("flat.qcow2", cwd: dir, context: "flatten")
                let info = try #require(try parseJSON(try await qemuImg(["info", "--output=json", "flat.qcow2"], cwd: dir), "info") as? [String: Any])
                #expect(info["backing-filename"] == nil, "flattened image still has a backing file: \(canonicalJSON(info))")
            }

            // -n into an existing image made by qemu-img with other options (holding old data).
            try await b.create("target.qcow2", size: "3M", options: "cluster_size=4k,extended_l2=off")
            try await b.io("target.qcow2", ["write -P 0x99 0 3M"])
            let n = try await qcow2(["convert", "-n", "-O", "qcow2", "top.qcow2", "target.qcow2"], cwd: dir, timeout: 120)
            expectSuccess(n)
            if n.succeeded {
                try await wExpectIdentical("top.qcow2", "target.qcow2", cwd: dir, context: "-n")
                try await wExpectCleanCheck("target.qcow2", cwd: dir, context: "-n")
                let info = try #require(try parseJSON(try await qemuImg(["info", "--output=json", "target.qcow2"], cwd: dir), "info") as? [String: Any])
                #expect((info["cluster-size"] as? NSNumber)?.intValue == 4096, "-n must keep the target's format options")
            }
        }
    }
}

func wFirstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? {
    let n = min(a.count, b.count)
    if let i = (0..<n).first(where: { a[$0] != b[$0] }) { return i }
    return a.count == b.count ? nil : n
}
