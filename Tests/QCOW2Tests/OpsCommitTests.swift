import Foundation
import Testing

// `qcow2 commit [-b BASE] [-d] IMAGE` against `qemu-img commit` with the same arguments on a
// copy of the same chain (twin directories). qemu-img commit runs a block job whose write
// order (and so host offsets) is not deterministic, so the judges are: same exit code and
// message; every image of the chain has qemu-img's guest content and qemu-img's info;
// every image checks clean; the committed image
// is emptied (no depth-0 extent in its map) unless -d or -b is given (QEMU: -b implies -d).

struct OpsCommitCase: Sendable, CustomTestStringConvertible {
    var name: String
    var args: [String]
    /// Chain files, bottom first; the last one is the image committed.
    var files: [String]
    var build: @Sendable (ImageBuilder) async throws -> Void
    var testDescription: String { name }

    /// True when QEMU empties the committed image.
    var empties: Bool { !args.contains("-d") && !args.contains("-b") }
}

extension OpsCommitCase {
    static func twoLayers(baseOptions: String?, topOptions: String?, baseFormat: String = "qcow2", baseSize: String = "4M",
                          topSize: String? = "8M") -> @Sendable (ImageBuilder) async throws -> Void {
        { b in
            let base = baseFormat == "raw" ? "base.raw" : "base.qcow2"
            try await b.create(base, size: baseSize, format: baseFormat, options: baseOptions)
            try await b.io(base, ["write -P 0x11 0 \(baseSize)"], format: baseFormat)
            try await b.create("top.qcow2", size: topSize, options: topOptions, backing: base, backingFormat: baseFormat)
            var w = ["write -P 0x22 1M 100k", "write -c -P 0x33 3M 64k", "write -P 0x44 \(topSize == nil ? "2M" : "5M") 64k",
                     "write -P 0x45 64k 512"]
            if !(topOptions ?? "").contains("compat=0.10") { w += ["write -z 2M 64k", "write -z 0 4k", "discard 1536k 64k"] }
            try await b.io("top.qcow2", w)
        }
    }

    static let threeLayers: @Sendable (ImageBuilder) async throws -> Void = { b in
        try await b.create("base.qcow2", size: "8M")
        try await b.io("base.qcow2", ["write -P 0x11 0 4M"])
        try await b.create("mid.qcow2", size: nil, backing: "base.qcow2")
        try await b.io("mid.qcow2", ["write -P 0x22 1M 1M", "write -z 2M 128k", "write -c -P 0x23 6M 128k"])
        try await b.create("top.qcow2", size: nil, backing: "mid.qcow2")
        try await b.io("top.qcow2", ["write -P 0x33 3M 64k", "write -z 0 64k", "write -c -P 0x44 5M 64k", "write -z 1M 8k",
                                     "write -P 0x34 7M 100k"])
    }

    static let all: [OpsCommitCase] = {
        let two2 = ["base.qcow2", "top.qcow2"], three = ["base.qcow2", "mid.qcow2", "top.qcow2"]
        return [
            OpsCommitCase(name: "2 layers, top larger than base", args: [], files: two2,
                          build: twoLayers(baseOptions: nil, topOptions: nil)),
            OpsCommitCase(name: "2 layers, -d", args: ["-d"], files: two2, build: twoLayers(baseOptions: nil, topOptions: nil)),
            OpsCommitCase(name: "2 layers, same size", args: [], files: two2,
                          build: twoLayers(baseOptions: nil, topOptions: nil, topSize: nil)),
            OpsCommitCase(name: "2 layers, 512-byte clusters in the top", args: [], files: two2,
                          build: twoLayers(baseOptions: nil, topOptions: "cluster_size=512")),
            OpsCommitCase(name: "2 layers, 512-byte clusters in the base", args: [], files: two2,
                          build: twoLayers(baseOptions: "cluster_size=512", topOptions: nil)),
            OpsCommitCase(name: "2 layers, extended_l2 top and base", args: [], files: two2,
                          build: twoLayers(baseOptions: "extended_l2=on", topOptions: "extended_l2=on,cluster_size=32k")),
            OpsCommitCase(name: "2 layers, compat=0.10 base (zeros become data)", args: [], files: two2,
                          build: twoLayers(baseOptions: "compat=0.10", topOptions: nil)),
            OpsCommitCase(name: "2 layers, compat=0.10 top and base", args: [], files: two2,
                          build: twoLayers(baseOptions: "compat=0.10", topOptions: "compat=0.10")),
            OpsCommitCase(name: "2 layers, raw base", args: [], files: ["base.raw", "top.qcow2"],
                          build: twoLayers(baseOptions: nil, topOptions: nil, baseFormat: "raw", topSize: nil)),
            OpsCommitCase(name: "3 layers, into mid (default)", args: [], files: three, build: threeLayers),
            OpsCommitCase(name: "3 layers, into mid, -d", args: ["-d"], files: three, build: threeLayers),
            OpsCommitCase(name: "3 layers, -b mid.qcow2", args: ["-b", "mid.qcow2"], files: three, build: threeLayers),
            OpsCommitCase(name: "3 layers, -b base.qcow2", args: ["-b", "base.qcow2"], files: three, build: threeLayers),
            OpsCommitCase(name: "3 layers, -b base.qcow2 -d", args: ["-b", "base.qcow2", "-d"], files: three, build: threeLayers),
            OpsCommitCase(name: "3 layers, commit the middle layer", args: [], files: ["base.qcow2", "mid.qcow2"], build: threeLayers),
        ]
    }()
}

@Suite("Ops: commit")
struct OpsCommitTests {
    @Test("commit == qemu-img commit on a copy of the chain", arguments: OpsCommitCase.all)
    func commit(_ c: OpsCommitCase) async throws {
        try await withTwin("commit-" + c.name) { t in
            try await c.build(t.builder)
            try t.mirror()
            let image = c.files.last!
            // Guest view of every layer before, for the "content preserved" judgement.
            var before: [String: [UInt8]] = [:]
            for f in c.files { before[f] = try await opsRaw(f, cwd: t.ours, format: f.hasSuffix(".raw") ? "raw" : "qcow2") }

            let r = try await t.both(["commit"] + c.args + [image], timeout: 180)
            opsExpectSameStatus(r, context: c.name)
            try #require(r.qemu.succeeded, "qemu-img commit must succeed here: \(r.qemu)")
            guard r.ours.succeeded else { return }
            #expect(r.ours.stdout == r.qemu.stdout, "\(c.name): printed \(r.ours.stdout.debugDescription) vs \(r.qemu.stdout.debugDescription)")

            for f in c.files {
                let fmt = f.hasSuffix(".raw") ? "raw" : "qcow2"
                let ctx = "\(c.name) [\(f)]"
                let a = try await opsRaw(f, cwd: t.ours, format: fmt), q = try await opsRaw(f, cwd: t.qemu, format: fmt)
                if let d = opsFirstDifference(a, q) { Issue.record("\(ctx): guest content differs from qemu-img's commit: \(d)") }
                try await opsExpectSameInfo(t, f, format: fmt, context: ctx)
                // (No map-layout comparison: QEMU's commit is a mirror job whose zero handling
                // depends on its chunking, e.g. it writes zeros as data into a 64k-cluster base
                // for a discarded 512-byte-cluster range, or punches holes into a raw base.)
                if fmt == "qcow2" { try await wExpectCleanCheck(f, cwd: t.ours, context: ctx) }
            }
            // The committed image still shows the same guest content (its data now lives below).
            let after = try await opsRaw(image, cwd: t.ours)
            if let d = opsFirstDifference(after, before[image]!) {
                Issue.record("\(c.name): the committed image's guest content changed: \(d)")
            }
            let map = try await opsMap(image, cwd: t.ours)
            let qmap = try await opsMap(image, cwd: t.qemu)
            if c.empties {
                #expect(qmap.allSatisfy { $0.depth > 0 }, "judge sanity: qemu-img left depth-0 extents in \(image)")
                let own = map.filter { $0.depth == 0 }
                #expect(own.isEmpty, "\(c.name): \(image) was not emptied: depth-0 extents \(own)")
            } else {
                #expect(map.contains { $0.depth == 0 }, "\(c.name): \(image) was emptied although -d/-b was given")
            }
        }
    }
}
