import Foundation
import Testing

// `qcow2 amend -o compat=…,lazy_refcounts=…,refcount_bits=… IMAGE` against `qemu-img amend`
// with the same options on a copy (twin directories). After every step: same exit code;
// `qemu-img info` of our image equals qemu-img's (except actual-size); the guest content is
// the original's (qemu-img compare with a saved copy); `qemu-img check` clean. Refused
// steps must leave our image unchanged.

struct OpsAmendCase: Sendable, CustomTestStringConvertible {
    var name: String
    var build: @Sendable (ImageBuilder) async throws -> Void
    /// Each entry is one `-o` value, applied in order (one amend per step).
    var steps: [String]
    var testDescription: String { name }
}

extension OpsAmendCase {
    /// Data, compressed, allocated zero clusters (zero write over data), plain zero clusters,
    /// a partial zero write inside data, in a v3 image.
    static func plain(_ options: String? = nil, size: String = "8M") -> @Sendable (ImageBuilder) async throws -> Void {
        { b in
            try await b.create("img.qcow2", size: size, options: options)
            var w = ["write -P 0x11 0 1M", "write -c -P 0x22 1536k 128k", "write -P 0x33 1900k 100k"]
            if !(options ?? "").contains("compat=0.10") {
                w += ["write -z 256k 128k", "write -z 1800k 64k", "write -z 512k 1k", "write -z -u 768k 64k"]
            }
            try await b.io("img.qcow2", w)
        }
    }

    static let withBacking: @Sendable (ImageBuilder) async throws -> Void = { b in
        try await b.create("base.qcow2", size: "8M", options: "compat=0.10")
        try await b.io("base.qcow2", ["write -P 0xbb 0 8M"])
        try await b.create("img.qcow2", size: nil, backing: "base.qcow2")
        try await b.io("img.qcow2", ["write -P 0x22 1M 1M", "write -z 256k 128k", "write -z 1536k 64k", "write -z -u 3M 100k",
                                     "write -z 4M 1k", "write -c -P 0x33 5M 64k", "discard 6M 64k"])
    }

    static let withSnapshot: @Sendable (ImageBuilder) async throws -> Void = { b in
        try await plain()(b)
        try await b.img(["snapshot", "-c", "snap", "img.qcow2"])
        try await b.io("img.qcow2", ["write -z 0 64k", "write -P 0x44 4M 64k", "write -z 5M 64k"])
    }

    /// Zero clusters in L2 tables shared between the active state and a snapshot, in a
    /// snapshot-only table, and over a backing file (so they need real clusters of zeros).
    static let withSnapshotAndBacking: @Sendable (ImageBuilder) async throws -> Void = { b in
        try await withBacking(b)
        try await b.img(["snapshot", "-c", "s1", "img.qcow2"])
        try await b.io("img.qcow2", ["write -z 6M 64k", "write -P 0x55 7M 64k"])
        try await b.img(["snapshot", "-c", "s2", "img.qcow2"])
        try await b.io("img.qcow2", ["write -z 7M 64k", "write -z 128k 64k"])
    }

    static let all: [OpsAmendCase] = [
        OpsAmendCase(name: "with snapshots and a backing file: downgrade to compat=0.10", build: withSnapshotAndBacking,
                     steps: ["compat=0.10"]),
        OpsAmendCase(name: "refused: downgrade with extended L2", build: plain("extended_l2=on"), steps: ["compat=0.10"]),
        OpsAmendCase(name: "refused: downgrade with zstd compressed clusters", build: plain("compression_type=zstd"), steps: ["compat=0.10"]),
        OpsAmendCase(name: "downgrade a zstd image without compressed clusters", build: { b in
            try await b.create("img.qcow2", size: "4M", options: "compression_type=zstd")
            try await b.io("img.qcow2", ["write -P 0x11 0 1M", "write -z 2M 64k"])
        }, steps: ["compat=0.10"]),
        OpsAmendCase(name: "refused: downgrade with 8-bit refcounts", build: plain("refcount_bits=8"), steps: ["compat=0.10"]),
        OpsAmendCase(name: "downgrade with 8-bit refcounts and refcount_bits=16 in one amend", build: plain("refcount_bits=8"),
                     steps: ["compat=0.10,refcount_bits=16"]),
        OpsAmendCase(name: "downgrade to compat=0.10 (zero clusters, no backing)", build: plain(), steps: ["compat=0.10"]),
        OpsAmendCase(name: "downgrade to compat=0.10 with a backing file (zero clusters must stay zero)", build: withBacking,
                     steps: ["compat=0.10"]),
        OpsAmendCase(name: "downgrade, 512-byte clusters", build: plain("cluster_size=512", size: "2M"), steps: ["compat=0.10"]),
        OpsAmendCase(name: "downgrade then upgrade", build: plain(), steps: ["compat=0.10", "compat=1.1", "compat=v3", "compat=0.10"]),
        OpsAmendCase(name: "upgrade a v2 image", build: plain("compat=0.10"), steps: ["compat=1.1", "lazy_refcounts=on", "compat=0.10"]),
        OpsAmendCase(name: "lazy_refcounts on/off", build: plain(), steps: ["lazy_refcounts=on", "lazy_refcounts=off", "lazy_refcounts=on"]),
        OpsAmendCase(name: "refcount_bits walk", build: plain(),
                     steps: ["refcount_bits=1", "refcount_bits=4", "refcount_bits=32",
                             "refcount_bits=64", "refcount_bits=16"]),
        OpsAmendCase(name: "refcount_bits, 512-byte clusters", build: plain("cluster_size=512", size: "4M"),
                     steps: ["refcount_bits=64", "refcount_bits=1", "refcount_bits=16"]),
        OpsAmendCase(name: "combined options", build: plain(),
                     steps: ["compat=1.1,lazy_refcounts=on,refcount_bits=64", "lazy_refcounts=off,refcount_bits=16,compat=0.10"]),
        OpsAmendCase(name: "with a backing file: refcount_bits and lazy_refcounts", build: withBacking,
                     steps: ["refcount_bits=4", "lazy_refcounts=on", "refcount_bits=16,lazy_refcounts=off"]),
        OpsAmendCase(name: "with an internal snapshot: refcount_bits", build: withSnapshot,
                     steps: ["refcount_bits=2", "refcount_bits=1", "refcount_bits=64"]),
        OpsAmendCase(name: "with an internal snapshot: downgrade to compat=0.10", build: withSnapshot, steps: ["compat=0.10"]),
        OpsAmendCase(name: "refused combinations", build: plain(),
                     steps: ["compat=0.10,lazy_refcounts=on", "compat=0.10,refcount_bits=8", "refcount_bits=3", "refcount_bits=128",
                             "compat=1.2", "cluster_size=4k", "extended_l2=on", "compression_type=zstd", "lazy_refcounts=maybe"]),
        OpsAmendCase(name: "refused: downgrade with extended_l2", build: plain("extended_l2=on"), steps: ["compat=0.10"]),
        OpsAmendCase(name: "refused: lazy_refcounts on a v2 image", build: plain("compat=0.10"), steps: ["lazy_refcounts=on"]),
    ]
}

@Suite("Ops: amend")
struct OpsAmendTests {
    @Test("amend == qemu-img amend (info, content, check)", arguments: OpsAmendCase.all)
    func amend(_ c: OpsAmendCase) async throws {
        try await withTwin("amend-" + c.name) { t in
            try await c.build(t.builder)
            try wCopy(t.o("img.qcow2"), t.o("orig.qcow2"))
            try t.mirror()
            let original = try await opsRaw("img.qcow2", cwd: t.ours)
            let originalSnaps = try await opsSnapshots("img.qcow2", cwd: t.ours)
            var snapContent: [String: [UInt8]] = [:]
            for (id, _) in originalSnaps {
                snapContent[id] = try await opsRaw("img.qcow2", cwd: t.ours, snapshotArg: "snapshot.id=\(id)")
            }
            for opts in c.steps {
                let ctx = "\(c.name): amend -o \(opts)"
                let before = try readFile(t.o("img.qcow2"))
                let r = try await t.both(["amend", "-o", opts, "img.qcow2"], timeout: 180)
                opsExpectSameStatus(r, context: ctx)
                if !r.qemu.succeeded {
                    #expect(!r.ours.stderr.isEmpty, "\(ctx): refused without a message: \(r.ours)")
                    #expect(try readFile(t.o("img.qcow2")) == before, "\(ctx): a refused amend changed our image")
                }
                try await opsExpectSameInfo(t, "img.qcow2", context: ctx)
                try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: ctx)
                let now = try await opsRaw("img.qcow2", cwd: t.ours)
                if let d = opsFirstDifference(now, original) { Issue.record("\(ctx): guest content changed: \(d)") }
                for (id, content) in snapContent {
                    let s = try await opsRaw("img.qcow2", cwd: t.ours, snapshotArg: "snapshot.id=\(id)")
                    if let d = opsFirstDifference(s, content) { Issue.record("\(ctx): snapshot \(id) content changed: \(d)") }
                }
                // Judge each step on its own: continue from our result in both directories.
                try t.mirror("img.qcow2")
            }
        }
    }
}
