import Foundation
import Testing

/// A pair of images for `compare`; `qemu-img compare` is the judge of the exit code
/// (0 identical, 1 different, 2 error) and of the mismatch offset.
struct ComparePair: Sendable, CustomTestStringConvertible {
    var name: String
    /// Builds both images; returns their names (relative to the builder's directory).
    var build: @Sendable (ImageBuilder) async throws -> (String, String)
    var testDescription: String { name }
}

@Suite("qcow2 compare")
struct CompareTests {
    @Test("exit code and offset agree with qemu-img compare", arguments: ComparePair.all)
    func compare(_ pair: ComparePair) async throws {
        try await withTempDir(pair.name) { tmp in
            let b = ImageBuilder(dir: tmp + "/img")
            try mkdir(b.dir)
            let (a, c) = try await pair.build(b)
            let q = try await run("qemu-img", ["compare", a, c], cwd: b.dir)
            try #require(!q.timedOut && !q.crashed && [0, 1, 2].contains(q.status ?? -1), "qemu-img compare: \(q)")
            let ours = try await qcow2(["compare", a, c], cwd: b.dir, timeout: 60)
            expectSane(ours)
            #expect(ours.status == q.status, "exit code: ours \(ours.status.map(String.init) ?? "signal") vs qemu-img \(q.status!)\nours: \(ours)\nqemu-img: \(q)")

            switch q.status {
            case 1:
                // qemu-img reports the mismatch at 512-byte granularity; accept that offset or the
                // exact first differing byte.
                let qemuOffset = try #require(integers(in: q.stdout).last, "no offset in qemu-img output: \(q.stdout)")
                var accepted: Set<UInt64> = [qemuOffset]
                if let exact = try await exactFirstDifference(a, c, dir: b.dir, tmp: tmp) { accepted.insert(exact) }
                let printed = Set(integers(in: ours.stdout + "\n" + ours.stderr))
                #expect(!printed.isDisjoint(with: accepted),
                        "offset: ours printed \(ours.stdout + ours.stderr) — expected one of \(accepted.sorted())")
            case 2:
                #expect(isOneLineMessage(ours.stderr), "expected a one-line error on stderr: \(ours)")
            default:
                break
            }
        }
    }

    /// The exact first differing byte, from raw conversions (the shorter image reads as zeros past its end).
    func exactFirstDifference(_ a: String, _ c: String, dir: String, tmp: String) async throws -> UInt64? {
        let ra = tmp + "/a.raw", rc = tmp + "/c.raw"
        try await qemuImg(["convert", "-O", "raw", a, ra], cwd: dir)
        try await qemuImg(["convert", "-O", "raw", c, rc], cwd: dir)
        var da = [UInt8](try readFile(ra)), dc = [UInt8](try readFile(rc))
        let n = max(da.count, dc.count)
        da += [UInt8](repeating: 0, count: n - da.count)
        dc += [UInt8](repeating: 0, count: n - dc.count)
        return (0..<n).first { da[$0] != dc[$0] }.map(UInt64.init)
    }
}

/// Every decimal or 0x-hex integer in `text`.
func integers(in text: String) -> [UInt64] {
    var result: [UInt64] = []
    let scalars = Array(text.unicodeScalars)
    var i = 0
    while i < scalars.count {
        if scalars[i] == "0", i + 1 < scalars.count, scalars[i + 1] == "x" || scalars[i + 1] == "X" {
            var j = i + 2
            var s = ""
            while j < scalars.count, scalars[j].properties.isASCIIHexDigit { s.unicodeScalars.append(scalars[j]); j += 1 }
            if let v = UInt64(s, radix: 16) { result.append(v) }
            i = j
        } else if ("0"..."9").contains(scalars[i]) {
            var j = i
            var s = ""
            while j < scalars.count, ("0"..."9").contains(scalars[j]) { s.unicodeScalars.append(scalars[j]); j += 1 }
            if let v = UInt64(s) { result.append(v) }
            i = j
        } else {
            i += 1
        }
    }
    return result
}

extension ComparePair {
    static func twoImages(
        _ name: String, a: (size: String, options: String?, cmds: [String]), b: (size: String, options: String?, cmds: [String])
    ) -> ComparePair {
        ComparePair(name: name) { builder in
            try await builder.create("a.qcow2", size: a.size, options: a.options)
            try await builder.io("a.qcow2", a.cmds)
            try await builder.create("b.qcow2", size: b.size, options: b.options)
            try await builder.io("b.qcow2", b.cmds)
            return ("a.qcow2", "b.qcow2")
        }
    }

    static let all: [ComparePair] = [
        twoImages("identical content, different cluster sizes",
                  a: ("2M", nil, ["write -P 0x11 0 64k", "write -P 0x12 1M 100"]),
                  b: ("2M", "cluster_size=4k", ["write -P 0x11 0 64k", "write -P 0x12 1M 100"])),
        twoImages("zero cluster vs unallocated vs written zeros",
                  a: ("2M", nil, ["write -z 0 64k", "write -P 0 64k 64k"]),
                  b: ("2M", nil, [])),
        twoImages("one byte differs at offset 1000",
                  a: ("2M", nil, ["write -P 0x11 0 64k"]),
                  b: ("2M", "cluster_size=4k", ["write -P 0x11 0 64k", "write -P 0x12 1000 1"])),
        twoImages("differs in the last byte",
                  a: ("2M", nil, []),
                  b: ("2M", nil, ["write -P 0x01 \(2 * 1048576 - 1) 1"])),
        twoImages("differs only in a compressed cluster",
                  a: ("2M", nil, ["write -c -P 0x21 64k 64k"]),
                  b: ("2M", nil, ["write -P 0x21 64k 64k", "write -P 0x22 100000 1"])),
        twoImages("different sizes, extra area zero → identical",
                  a: ("1M", nil, ["write -P 0x31 0 4k"]),
                  b: ("3M", nil, ["write -P 0x31 0 4k", "write -z 2M 64k"])),
        twoImages("different sizes, data in the extra area",
                  a: ("1M", nil, ["write -P 0x31 0 4k"]),
                  b: ("3M", nil, ["write -P 0x31 0 4k", "write -P 0x32 2500000 1"])),
        twoImages("longer image first",
                  a: ("3M", nil, ["write -P 0x41 2M 4k"]),
                  b: ("1M", nil, [])),
        ComparePair(name: "qcow2 vs its raw conversion") { b in
            try await b.create("a.qcow2", size: "4M", options: "cluster_size=512")
            try await b.io("a.qcow2", standardWrites(clusterSize: 512, size: 4 << 20))
            try await b.img(["convert", "-O", "raw", "a.qcow2", "a.raw"])
            return ("a.qcow2", "a.raw")
        },
        ComparePair(name: "overlay vs flattened chain") { b in
            try await b.create("base.qcow2", size: "2M")
            try await b.io("base.qcow2", ["write -P 0x51 0 2M"])
            try await b.create("top.qcow2", size: "2M", backing: "base.qcow2")
            try await b.io("top.qcow2", ["write -P 0x52 1000 10", "write -z 1M 64k"])
            try await b.img(["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"])
            return ("top.qcow2", "flat.qcow2")
        },
        ComparePair(name: "overlay vs its backing file") { b in
            try await b.create("base.qcow2", size: "2M")
            try await b.io("base.qcow2", ["write -P 0x51 0 2M"])
            try await b.create("top.qcow2", size: "2M", backing: "base.qcow2")
            try await b.io("top.qcow2", ["write -z 1536k 4k"])
            return ("top.qcow2", "base.qcow2")
        },
        ComparePair(name: "second file missing") { b in
            try await b.create("a.qcow2", size: "1M")
            return ("a.qcow2", "missing.qcow2")
        },
        ComparePair(name: "first file missing") { b in
            try await b.create("a.qcow2", size: "1M")
            return ("missing.qcow2", "a.qcow2")
        },
        ComparePair(name: "malformed image (version 4)") { b in
            try await b.create("a.qcow2", size: "1M")
            try await b.create("b.qcow2", size: "1M")
            try patchBE32(b.path("b.qcow2"), at: 4, 4)
            return ("a.qcow2", "b.qcow2")
        },
    ]
}

@Suite("qcow2 convert options")
struct ConvertOptionTests {
    /// `-p`, `-S`, `-f` do not change the content (qemu-img with the same options is the judge).
    @Test("options keep the output identical to qemu-img's", arguments: [
        ["-p"], ["-S", "0"], ["-S", "4k"], ["-S", "64k"], ["-f", "qcow2"], ["-f", "raw"], ["-f", "qcow2", "-p", "-S", "512"],
    ])
    func convertOptions(_ options: [String]) async throws {
        try await withTempDir("convert-opts") { tmp in
            let b = ImageBuilder(dir: tmp)
            try await b.create("img.qcow2", size: "4M", options: "cluster_size=4k")
            try await b.io("img.qcow2", standardWrites(clusterSize: 4096, size: 4 << 20) + ["write -c -P 0x66 3M 4k"])
            try await qemuImg(["convert"] + options + ["-O", "raw", "img.qcow2", "qemu.raw"], cwd: tmp)
            let ours = try await qcow2(["convert"] + options + ["-O", "raw", "img.qcow2", "ours.raw"], cwd: tmp)
            expectSuccess(ours)
            if ours.succeeded {
                let diff = try fileDifference(tmp + "/ours.raw", tmp + "/qemu.raw")
                #expect(diff == nil, "convert \(options): \(diff ?? "")")
            }
        }
    }

    @Test("a raw input file converts to an identical copy")
    func rawInput() async throws {
        try await withTempDir("raw-input") { tmp in
            try writeFile(tmp + "/in.raw", mixedData(size: 1 << 20, seed: 42))
            let ours = try await qcow2(["convert", "-O", "raw", "in.raw", "out.raw"], cwd: tmp)
            expectSuccess(ours)
            if ours.succeeded {
                let diff = try fileDifference(tmp + "/out.raw", tmp + "/in.raw")
                #expect(diff == nil, "raw → raw: \(diff ?? "")")
            }
        }
    }

    @Test("runtime errors: exit 1 and one line on stderr", arguments: [
        ["convert", "-O", "raw", "missing.qcow2", "out.raw"],
        ["info", "missing.qcow2"],
        ["info", "--output=json", "missing.qcow2"],
        ["map", "--output=json", "missing.qcow2"],
        ["convert", "-f", "vmdk", "-O", "raw", "img.qcow2", "out.raw"],
        ["convert", "-O", "raw", "img.qcow2", "no-such-dir/out.raw"],
        ["info", "."],
    ])
    func runtimeErrors(_ args: [String]) async throws {
        try await withTempDir("runtime-errors") { tmp in
            try await qemuImg(["create", "-q", "-f", "qcow2", "img.qcow2", "1M"], cwd: tmp)
            let r = try await qcow2(args, cwd: tmp)
            expectCleanFailure(r)
        }
    }

    @Test("usage errors fail without crashing", arguments: [
        ["info", "--output=xml", "img.qcow2"],
        ["convert", "img.qcow2"],
        ["no-such-command"],
        ["map"],
    ])
    func usageErrors(_ args: [String]) async throws {
        try await withTempDir("usage") { tmp in
            try await qemuImg(["create", "-q", "-f", "qcow2", "img.qcow2", "1M"], cwd: tmp)
            let r = try await qcow2(args, cwd: tmp)
            expectSane(r)
            #expect(!r.succeeded, "expected failure: \(r)")
            #expect(!r.stderr.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "expected a message on stderr: \(r)")
        }
    }
}
