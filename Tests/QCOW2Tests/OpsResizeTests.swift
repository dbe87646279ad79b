import Foundation
import Testing

// `qcow2 resize [--shrink] IMAGE [+|-]SIZE` against `qemu-img resize` with the same
// arguments on a copy (twin directories, same file names).

struct OpsResizeCase: Sendable, CustomTestStringConvertible {
    var name: String
    var format = "qcow2"
    var options: String?
    var initialSize: String
    var writes: [String] = []
    /// Extra preparation in `ours` before mirroring (backing files, snapshots).
    var setup: (@Sendable (ImageBuilder) async throws -> Void)?
    /// Arguments between `resize` and the image (e.g. `--shrink`).
    var flags: [String] = []
    var newSize: String
    /// Whether `judge` compares bytes (the shrink test does it itself, with its own message).
    var bytes = true
    var image: String { format == "raw" ? "img.raw" : "img.qcow2" }
    var testDescription: String { name }

    static func grow(_ name: String, _ options: String?, from: String, to: String, writes: [String] = [],
                     setup: (@Sendable (ImageBuilder) async throws -> Void)? = nil) -> OpsResizeCase {
        OpsResizeCase(name: name, options: options, initialSize: from, writes: writes, setup: setup, newSize: to)
    }
    static func shrink(_ name: String, _ options: String?, from: String, to: String, writes: [String] = [],
                       setup: (@Sendable (ImageBuilder) async throws -> Void)? = nil) -> OpsResizeCase {
        OpsResizeCase(name: name, options: options, initialSize: from, writes: writes, setup: setup,
                      flags: ["--shrink"], newSize: to, bytes: false)
    }
}

extension OpsResizeCase {
    static let data16M = ["write -P 0x11 0 1M", "write -c -P 0x22 2M 256k", "write -z 3M 64k", "write -P 0x33 15M 1M",
                          "write -P 0x44 8M 100k"]

    static let grows: [OpsResizeCase] = [
        .grow("64k 16M -> 1G with data", nil, from: "16M", to: "1G", writes: data16M),
        .grow("64k 16M -> +100M (relative)", nil, from: "16M", to: "+100M", writes: data16M),
        .grow("64k same size (no-op)", nil, from: "16M", to: "16M", writes: data16M),
        .grow("64k +512 (one sector)", nil, from: "16M", to: "+512", writes: data16M),
        .grow("odd size 1000448 -> 2M", nil, from: "1000448", to: "2M", writes: ["write -P 1 0 1000448"]),
        .grow("512-byte clusters 1M -> 1G (L1 table moves)", "cluster_size=512", from: "1M", to: "1G",
              writes: ["write -P 0x11 0 100k", "write -P 0x22 900k 124k", "write -z 200k 4k"]),
        .grow("512-byte clusters 1M -> 4G", "cluster_size=512", from: "1M", to: "4G", writes: ["write -P 0x11 0 1M"]),
        .grow("512-byte clusters, refcount_bits=1, 64M -> 16G (refcount table grows)", "cluster_size=512,refcount_bits=1",
              from: "64M", to: "16G", writes: ["write -P 0x11 1M 64k"]),
        .grow("512-byte clusters, refcount_bits=64, 8M -> 2G", "cluster_size=512,refcount_bits=64",
              from: "8M", to: "2G", writes: ["write -P 0x11 0 1M"]),
        .grow("4k clusters 100M -> 10G", "cluster_size=4k", from: "100M", to: "10G", writes: ["write -P 0x11 0 1M", "write -P 2 99M 1M"]),
        .grow("2M clusters 1G -> 1T", "cluster_size=2M", from: "1G", to: "1T", writes: ["write -P 0x11 1M 64k"]),
        .grow("extended_l2 32k 5M -> 5G", "extended_l2=on,cluster_size=32k", from: "5M", to: "5G",
              writes: ["write -P 0x11 0 100k", "write -z 1M 3k", "write -P 2 4M 1M"]),
        .grow("compat=0.10 16M -> 3G", "compat=0.10", from: "16M", to: "3G", writes: data16M),
        .grow("lazy_refcounts=on", "lazy_refcounts=on", from: "16M", to: "200M", writes: data16M),
        .grow("preallocation=metadata image", "preallocation=metadata", from: "10M", to: "20M"),
        .grow("preallocation=full image", "preallocation=full", from: "10M", to: "20M"),
        .grow("overlay grown past its backing file", nil, from: "", to: "8M", writes: ["write -P 2 1M 64k"],
              setup: { b in
                  try await b.create("base.qcow2", size: "4M")
                  try await b.io("base.qcow2", ["write -P 1 0 4M"])
                  try await b.create("img.qcow2", size: nil, backing: "base.qcow2")
              }),
        .grow("v3 image with an internal snapshot", nil, from: "4M", to: "64M", writes: ["write -P 1 0 4M"],
              setup: { b in
                  try await b.create("img.qcow2", size: "4M")
                  try await b.io("img.qcow2", ["write -P 1 0 2M"])
                  try await b.img(["snapshot", "-c", "s", "img.qcow2"])
              }),
    ]

    static let shrinks: [OpsResizeCase] = [
        .shrink("64k 16M -> 8M", nil, from: "16M", to: "8M", writes: data16M),
        .shrink("64k 16M -> 1000k (not cluster aligned)", nil, from: "16M", to: "1000k", writes: data16M),
        .shrink("64k 16M -> -15M (relative)", nil, from: "16M", to: "-15M", writes: data16M),
        .shrink("all compressed 4M -> 1000k", nil, from: "4M", to: "1000k", writes: ["write -c -P 1 0 4M"]),
        .shrink("512-byte clusters 2M -> 511k", "cluster_size=512", from: "2M", to: "511k", writes: ["write -P 1 0 2M"]),
        .shrink("512-byte clusters 64M -> 1M (L1 shrinks)", "cluster_size=512", from: "64M", to: "1M",
                writes: ["write -P 1 0 1M", "write -P 2 60M 1M"]),
        .shrink("extended_l2 4M -> 1056k (mid-cluster)", "extended_l2=on", from: "4M", to: "1056k",
                writes: ["write -P 1 0 4M", "write -z 1M 8k"]),
        .shrink("compat=0.10 4M -> 1000k", "compat=0.10", from: "4M", to: "1000k", writes: ["write -P 1 0 4M"]),
        .shrink("1G sparse -> 500M", nil, from: "1G", to: "500M", writes: ["write -P 1 0 1M", "write -P 2 900M 1M"]),
        .shrink("preallocation=metadata 10M -> 5M", "preallocation=metadata", from: "10M", to: "5M"),
        .shrink("overlay shrunk below its backing file", nil, from: "", to: "1M", writes: ["write -P 2 512k 1M"],
                setup: { b in
                    try await b.create("base.qcow2", size: "4M")
                    try await b.io("base.qcow2", ["write -P 1 0 4M"])
                    try await b.create("img.qcow2", size: nil, backing: "base.qcow2")
                }),
        // QEMU allows resizing v3 images with internal snapshots, shrinking included (the
        // snapshot keeps its clusters and its own size).
        .shrink("v3 image with an internal snapshot 4M -> 1M", nil, from: "4M", to: "1M", writes: ["write -P 2 0 4M"],
                setup: { b in
                    try await b.create("img.qcow2", size: "4M")
                    try await b.io("img.qcow2", ["write -P 1 0 4M"])
                    try await b.img(["snapshot", "-c", "s", "img.qcow2"])
                }),
    ]

    /// qemu-img refuses these; so must we, leaving the image unchanged.
    static let refused: [OpsResizeCase] = [
        OpsResizeCase(name: "shrink without --shrink", initialSize: "16M", writes: data16M, newSize: "8M"),
        OpsResizeCase(name: "relative shrink without --shrink", initialSize: "16M", writes: data16M, newSize: "-1M"),
        OpsResizeCase(name: "shrink to 0 without --shrink", initialSize: "16M", newSize: "0"),
        OpsResizeCase(name: "shrink to 0 with --shrink (size must be positive)", initialSize: "16M", writes: data16M,
                      flags: ["--shrink"], newSize: "0"),
        OpsResizeCase(name: "relative below zero", initialSize: "16M", flags: ["--shrink"], newSize: "-32M"),
        OpsResizeCase(name: "not a multiple of 512 (absolute)", initialSize: "1M", newSize: "1048577"),
        OpsResizeCase(name: "not a multiple of 512 (+1)", initialSize: "1M", newSize: "+1"),
        OpsResizeCase(name: "not a multiple of 512 (shrink)", initialSize: "1M", flags: ["--shrink"], newSize: "1048575"),
        OpsResizeCase(name: "not a number", initialSize: "1M", newSize: "lots"),
        OpsResizeCase(name: "512-byte clusters beyond the L1 limit", options: "cluster_size=512", initialSize: "1M", newSize: "4T"),
        OpsResizeCase(name: "v2 image with an internal snapshot", options: "compat=0.10", initialSize: "4M",
                      setup: { b in
                          try await b.create("img.qcow2", size: "4M", options: "compat=0.10")
                          try await b.io("img.qcow2", ["write -P 1 0 1M"])
                          try await b.img(["snapshot", "-c", "s", "img.qcow2"])
                      }, newSize: "8M"),
    ]

    static let raw: [OpsResizeCase] = [
        OpsResizeCase(name: "raw grow", format: "raw", initialSize: "1M", writes: ["write -P 1 0 1M"], newSize: "3M"),
        OpsResizeCase(name: "raw grow relative", format: "raw", initialSize: "1M", writes: ["write -P 1 0 1M"], newSize: "+2M"),
        OpsResizeCase(name: "raw grow by one byte", format: "raw", initialSize: "1M", writes: ["write -P 1 0 1M"], newSize: "+1"),
        OpsResizeCase(name: "raw grow to an odd size", format: "raw", initialSize: "1M", newSize: "3000001"),
        OpsResizeCase(name: "raw shrink", format: "raw", initialSize: "3M", writes: ["write -P 1 0 3M"], flags: ["--shrink"], newSize: "1M"),
        OpsResizeCase(name: "raw shrink to an odd size", format: "raw", initialSize: "3M", writes: ["write -P 1 0 3M"],
                      flags: ["--shrink"], newSize: "1000001"),
        OpsResizeCase(name: "raw shrink without --shrink", format: "raw", initialSize: "3M", writes: ["write -P 1 0 3M"], newSize: "1M"),
        OpsResizeCase(name: "raw shrink to 0", format: "raw", initialSize: "3M", writes: ["write -P 1 0 3M"], flags: ["--shrink"], newSize: "0"),
    ]
}

@Suite("Ops: resize")
struct OpsResizeTests {
    func prepare(_ c: OpsResizeCase, _ t: OpsTwin) async throws {
        let b = t.builder
        if let setup = c.setup {
            try await setup(b)
        } else {
            try await b.create(c.image, size: c.initialSize, format: c.format, options: c.options)
        }
        if !c.writes.isEmpty { try await b.io(c.image, c.writes, format: c.format) }
        try t.mirror()
    }

    /// Runs the case with both tools; returns the results (after judging status and output).
    @discardableResult
    func judge(_ c: OpsResizeCase, _ t: OpsTwin) async throws -> (ours: ToolResult, qemu: ToolResult) {
        let before = try readFile(t.o(c.image))
        let r = try await t.both(["resize", "-f", c.format] + c.flags + [c.image, c.newSize])
        opsExpectSameStatus(r, context: c.name)
        #expect(r.ours.stdout == r.qemu.stdout, "\(c.name): printed \(r.ours.stdout.debugDescription) vs qemu-img \(r.qemu.stdout.debugDescription)")
        if !r.qemu.succeeded {
            #expect(!r.ours.stderr.isEmpty, "\(c.name): refused without a message: \(r.ours)")
            #expect(try readFile(t.o(c.image)) == before, "\(c.name): a refused resize changed our image")
        }
        guard r.ours.succeeded, r.qemu.succeeded else { return r }
        try await opsExpectSameInfo(t, c.image, format: c.format, context: c.name)
        if c.format == "qcow2" { try await wExpectCleanCheck(c.image, cwd: t.ours, context: c.name) }
        try await opsExpectSameContent(t.o(c.image), t.q(c.image), formatA: c.format, formatB: c.format, cwd: t.root,
                                       context: c.name + " (vs qemu-img's resize)")
        if c.bytes {
            try opsExpectSameBytes(t.o(c.image), t.q(c.image), maskSnapshotDates: false, context: c.name)
        }
        return r
    }

    @Test("grow: byte-identical to qemu-img resize", arguments: OpsResizeCase.grows)
    func grow(_ c: OpsResizeCase) async throws {
        try await withTwin("resize-" + c.name) { t in
            try await prepare(c, t)
            try await judge(c, t)
        }
    }

    @Test("shrink with --shrink: same content, info, clean check and bytes as qemu-img", arguments: OpsResizeCase.shrinks)
    func shrink(_ c: OpsResizeCase) async throws {
        try await withTwin("shrink-" + c.name) { t in
            try await prepare(c, t)
            let r = try await judge(c, t)
            guard r.ours.succeeded, r.qemu.succeeded else { return }
            // After a shrink QEMU discards the clusters past the end, frees refcount blocks
            // that became empty and truncates the file after the last used cluster: the image
            // should come out byte-identical too.
            try opsExpectSameBytes(t.o(c.image), t.q(c.image), maskSnapshotDates: true,
                                   context: c.name + " (bytes after the shrink)")
            // Snapshots (if any) are untouched: their content reads like qemu-img's.
            for (id, _) in try await opsSnapshots(c.image, cwd: t.ours) {
                let a = try await opsRaw(c.image, cwd: t.ours, snapshotArg: "snapshot.id=\(id)")
                let q = try await opsRaw(c.image, cwd: t.qemu, snapshotArg: "snapshot.id=\(id)")
                if let d = opsFirstDifference(a, q) { Issue.record("\(c.name): snapshot \(id) differs after the shrink: \(d)") }
            }
        }
    }

    @Test("refused like qemu-img: exit 1, image unchanged", arguments: OpsResizeCase.refused)
    func refused(_ c: OpsResizeCase) async throws {
        try await withTwin("resize-bad-" + c.name) { t in
            try await prepare(c, t)
            let r = try await judge(c, t)
            #expect(!r.qemu.succeeded, "qemu-img was expected to refuse \(c.name): \(r.qemu)")
            if c.format == "qcow2" { try await wExpectCleanCheck(c.image, cwd: t.ours, context: c.name) }
        }
    }

    @Test("raw images like qemu-img (bytes and size)", arguments: OpsResizeCase.raw)
    func raw(_ c: OpsResizeCase) async throws {
        try await withTwin("resize-raw-" + c.name) { t in
            try await prepare(c, t)
            try await judge(c, t)
            #expect(try fileSize(t.o(c.image)) == fileSize(t.q(c.image)), "\(c.name): raw file sizes differ")
        }
    }

    @Test("grow then shrink back then grow: still identical to the same qemu-img sequence")
    func sequence() async throws {
        try await withTwin("resize-seq") { t in
            try await t.builder.create("img.qcow2", size: "3M", options: "cluster_size=4k")
            try await t.builder.io("img.qcow2", ["write -P 1 0 3M"])
            try t.mirror()
            for (flags, size) in [([String](), "+61M"), ([], "1G"), (["--shrink"], "2M"), ([], "+1M"), (["--shrink"], "-1M")] {
                let ctx = "resize \(flags.joined()) \(size)"
                let r = try await t.both(["resize"] + flags + ["img.qcow2", size])
                opsExpectSameStatus(r, context: ctx)
                try await opsExpectSameInfo(t, "img.qcow2", context: ctx)
                try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: ctx)
                try await opsExpectSameContent(t.o("img.qcow2"), t.q("img.qcow2"), cwd: t.root, context: ctx)
                try t.mirror("img.qcow2") // judge each step on its own
            }
        }
    }
}
