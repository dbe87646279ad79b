import Foundation
import Testing

// `qcow2 create -o preallocation=metadata|falloc|full` and external data files
// (data_file, data_file_raw): WriteCreateTests already compares the created bytes, info and
// check for a few sizes. Added here: more sizes and layouts, `qemu-img map` of our image
// against qemu-img's image (exact, offsets included), our own `map`/`info` against
// qemu-img's view of our image, and writes into the preallocated image (`qcow2 io` vs
// `qemu-io` on qemu-img's image: same bytes, same map, check clean).

struct OpsPreallocCase: Sendable, CustomTestStringConvertible {
    var options: String
    var size: String
    var dataFile: String? { options.contains("data_file=") ? "img.data" : nil }
    var testDescription: String { "\(options) size \(size)" }

    static let all: [OpsPreallocCase] = {
        var out: [OpsPreallocCase] = []
        // Every layout with preallocation=metadata; the main ones with falloc and full.
        let layouts: [(String, [String], Bool)] = [
            ("", ["3M", "3000000", "130M"], true), (",cluster_size=512", ["3M", "5M"], true), (",cluster_size=1k", ["20M"], false),
            (",cluster_size=2M", ["7M"], false), (",extended_l2=on", ["3M"], true), (",compat=0.10", ["3M"], false),
            (",refcount_bits=1,cluster_size=4k", ["9M"], false), (",data_file=img.data", ["3M"], true),
            (",data_file=img.data,data_file_raw=on", ["3M"], true),
        ]
        for p in ["metadata", "falloc", "full"] {
            for (layout, sizes, everyMode) in layouts where p == "metadata" || everyMode {
                for s in sizes where p == "metadata" || s == "3M" {
                    out.append(OpsPreallocCase(options: "preallocation=\(p)" + layout, size: s))
                }
            }
        }
        out.append(OpsPreallocCase(options: "data_file=img.data,data_file_raw=on", size: "3M"))
        out.append(OpsPreallocCase(options: "data_file=img.data,data_file_raw=on,extended_l2=on", size: "3M"))
        return out
    }()
}

@Suite("Ops: preallocated create and external data files")
struct OpsCreateTests {
    @Test("create: bytes, map, info, check vs qemu-img; then writes vs qemu-io", arguments: OpsPreallocCase.all)
    func prealloc(_ c: OpsPreallocCase) async throws {
        try await checkPrealloc(c)
    }

    func checkPrealloc(_ c: OpsPreallocCase) async throws {
        try await withTwin("prealloc-" + c.testDescription) { t in
            let args = ["create", "-q", "-f", "qcow2", "-o", c.options, "img.qcow2", c.size]
            let r = try await t.both(args, timeout: 180)
            opsExpectSameStatus(r, context: c.testDescription)
            try #require(r.qemu.succeeded && r.ours.succeeded)
            let ctx = c.testDescription
            try opsExpectSameBytes(t.o("img.qcow2"), t.q("img.qcow2"), maskSnapshotDates: false, context: ctx + " (created)")
            if let df = c.dataFile {
                #expect(try fileDifference(t.o(df), t.q(df)) == nil, "\(ctx): data file differs from qemu-img's")
            }
            try await judgeImage(t, dataFile: c.dataFile != nil, context: ctx + " (created)")

            // Writes: partial, across clusters, zero (with and without unmap), discards, the end.
            let cmds = ["write -P 0x11 1000 70000", "write -z 1M 64k", "discard 2M 128k", "write -z -u 1536k 64k",
                        "write -P 0x33 \(sizeBytes(c.size) - 72 * 1024) 72k", "write -z 200k 3k", "discard 2500k 1k",
                        "write -P 0x44 2600k 4k"]
            let o = try await wOurIO("img.qcow2", cmds, cwd: t.ours)
            expectSane(o)
            let q = try await wQemuIO("img.qcow2", cmds, cwd: t.qemu)
            #expect(wIOClean(o) == wIOClean(q), "\(ctx): io: ours \(o)\nqemu-io \(q)")
            try opsExpectSameBytes(t.o("img.qcow2"), t.q("img.qcow2"), maskSnapshotDates: false, context: ctx + " (after writes)")
            if let df = c.dataFile {
                #expect(try fileDifference(t.o(df), t.q(df)) == nil, "\(ctx): data file differs from qemu-io's after the writes")
            }
            try await judgeImage(t, dataFile: c.dataFile != nil, context: ctx + " (after writes)")
        }
    }

    func sizeBytes(_ s: String) -> Int {
        let units: [Character: Int] = ["k": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        if let u = s.last, let m = units[u] { return Int(s.dropLast())! * m }
        return Int(s)!
    }

    /// qemu-img map of ours == of qemu-img's (exact); our map/info == qemu-img's on our
    /// image; check clean; guest content equal.
    func judgeImage(_ t: OpsTwin, dataFile: Bool, context: String) async throws {
        let qOurs = try await qemuImg(["map", "--output=json", "img.qcow2"], cwd: t.ours)
        let qQemu = try await qemuImg(["map", "--output=json", "img.qcow2"], cwd: t.qemu)
        #expect(qOurs == qQemu, "\(context): qemu-img map of our image differs from its map of qemu-img's image")
        let ourMap = try await qcow2(["map", "--output=json", "img.qcow2"], cwd: t.ours, timeout: 60)
        expectSuccess(ourMap)
        if ourMap.succeeded { try compareMap(ours: ourMap.stdout, qemu: qOurs, context: context + " qcow2 map") }
        let qInfo = try await qemuImg(["info", "--output=json", "img.qcow2"], cwd: t.ours)
        let ourInfo = try await qcow2(["info", "--output=json", "img.qcow2"], cwd: t.ours)
        expectSuccess(ourInfo)
        if ourInfo.succeeded { try compareInfo(ours: ourInfo.stdout, qemu: qInfo, chain: false, context: context + " qcow2 info") }
        try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: context)
        if dataFile {
            // A relative data_file name is resolved against the working directory: read each in its own.
            let a = try await opsRaw("img.qcow2", cwd: t.ours), b = try await opsRaw("img.qcow2", cwd: t.qemu)
            if let d = opsFirstDifference(a, b) { Issue.record("\(context): guest content differs: \(d)") }
        } else {
            try await opsExpectSameContent(t.o("img.qcow2"), t.q("img.qcow2"), cwd: t.root, context: context)
        }
    }
}
