import Foundation
import Testing

// `qcow2 rebase [-u] -b NEW -F FMT IMAGE` and `-b ""` against `qemu-img rebase` with the
// same arguments on a copy of the same files (twin directories). Safe rebase: the guest
// content of the image must not change (qemu-img compare with a saved copy that still
// points at the old backing file), the image must be byte-identical to qemu-img's result
// and check clean. Unsafe rebase only rewrites the header: same bytes, same info.

/// The chain every case starts from, built in `ours` with the qemu tools:
/// base.qcow2 (4 MiB of data) <- mid.qcow2 (some data, zeros) <- img.qcow2 (8 MiB overlay:
/// data, compressed, zero, a write past base's end), plus candidate new backing files.
func opsBuildRebaseChain(_ b: ImageBuilder, topOptions: String?, midOptions: String? = nil,
                         candidates: [String]? = nil) async throws {
    try await b.create("base.qcow2", size: "4M")
    try await b.io("base.qcow2", ["write -P 0x11 0 4M", "write -z 3M 64k"])
    try await b.create("mid.qcow2", size: "6M", options: midOptions, backing: "base.qcow2")
    try await b.io("mid.qcow2", ["write -P 0x22 1M 1M", "write -z 2M 128k", "write -P 0x23 5M 4k"])
    try await b.create("img.qcow2", size: "8M", options: topOptions, backing: "mid.qcow2")
    var top = ["write -P 0x33 3M 64k", "write -P 0x34 100k 5000", "write -P 0x35 7M 1M"]
    if !(topOptions ?? "").contains("compat=0.10") { top += ["write -z 0 64k", "write -z 1536k 64k"] }
    top.append("write -c -P 0x36 6M 128k")
    try await b.io("img.qcow2", top)
    // Candidate new backing files (only those asked for: each costs two qemu processes).
    let want = { (name: String) in candidates?.contains(name) ?? true }
    if want("other.qcow2") {
        try await b.create("other.qcow2", size: "8M")
        try await b.io("other.qcow2", ["write -P 0x11 0 512k", "write -P 0x44 2M 2M", "write -z 5M 1M"])
    }
    if want("small.qcow2") {
        try await b.create("small.qcow2", size: "1M")
        try await b.io("small.qcow2", ["write -P 0x55 0 1M"])
    }
    if want("big.qcow2") {
        try await b.create("big.qcow2", size: "16M")
        try await b.io("big.qcow2", ["write -P 0x11 0 16M"])
    }
    if want("other.raw") {
        try await b.create("other.raw", size: "6M", format: "raw")
        try await b.io("other.raw", ["write -P 0x11 0 512k", "write -P 0x66 4M 1M"], format: "raw")
    }
    if want("v2small.qcow2") {
        try await b.create("v2small.qcow2", size: "6M", options: "compat=0.10,cluster_size=512")
        try await b.io("v2small.qcow2", ["write -P 0x66 1M 3M"])
    }
    try wCopy(b.path("img.qcow2"), b.path("orig.qcow2"))
}

struct OpsRebaseCase: Sendable, CustomTestStringConvertible {
    var name: String
    var topOptions: String?
    var args: [String]
    var testDescription: String { name }

    static let targets: [(String, [String])] = [
        ("drop the middle layer (-b base.qcow2)", ["-b", "base.qcow2", "-F", "qcow2"]),
        ("unrelated qcow2", ["-b", "other.qcow2", "-F", "qcow2"]),
        ("raw backing", ["-b", "other.raw", "-F", "raw"]),
        ("flatten (-b \"\")", ["-b", ""]),
        ("smaller new backing", ["-b", "small.qcow2", "-F", "qcow2"]),
        ("larger new backing (old backing ends early)", ["-b", "big.qcow2", "-F", "qcow2"]),
        ("v2 512-byte-cluster backing", ["-b", "v2small.qcow2", "-F", "qcow2"]),
        ("same backing again (no-op)", ["-b", "mid.qcow2", "-F", "qcow2"]),
    ]
    static let tops: [(String, String?)] = [
        ("64k", nil),
        ("512-byte clusters", "cluster_size=512"),
        ("extended_l2 32k", "extended_l2=on,cluster_size=32k"),
        ("compat=0.10", "compat=0.10"),
    ]
    /// Every target for the default overlay; the most telling ones for the other layouts.
    static let all: [OpsRebaseCase] = tops.flatMap { top in
        targets.enumerated()
            .filter { top.1 == nil || [0, 2, 3, 5].contains($0.offset) }
            .map { OpsRebaseCase(name: "\(top.0): \($0.element.0)", topOptions: top.1, args: $0.element.1) }
    }

    static let unsafe: [OpsRebaseCase] = [
        OpsRebaseCase(name: "-u onto another qcow2", topOptions: nil, args: ["-u", "-b", "other.qcow2", "-F", "qcow2"]),
        OpsRebaseCase(name: "-u onto raw", topOptions: nil, args: ["-u", "-b", "other.raw", "-F", "raw"]),
        OpsRebaseCase(name: "-u remove the backing file", topOptions: nil, args: ["-u", "-b", ""]),
        OpsRebaseCase(name: "-u onto a missing file", topOptions: nil, args: ["-u", "-b", "missing.qcow2", "-F", "qcow2"]),
        OpsRebaseCase(name: "-u a long name", topOptions: nil,
                      args: ["-u", "-b", "sub/" + String(repeating: "long-backing-name-", count: 12) + ".qcow2", "-F", "qcow2"]),
        OpsRebaseCase(name: "-u compat=0.10 image", topOptions: "compat=0.10", args: ["-u", "-b", "other.qcow2", "-F", "qcow2"]),
        OpsRebaseCase(name: "-u compat=0.10 remove", topOptions: "compat=0.10", args: ["-u", "-b", ""]),
    ]

    static let refused: [OpsRebaseCase] = [
        OpsRebaseCase(name: "-b without -F", topOptions: nil, args: ["-b", "other.qcow2"]),
        OpsRebaseCase(name: "-u -b without -F", topOptions: nil, args: ["-u", "-b", "other.qcow2"]),
        OpsRebaseCase(name: "missing new backing file", topOptions: nil, args: ["-b", "missing.qcow2", "-F", "qcow2"]),
    ]
}

@Suite("Ops: rebase")
struct OpsRebaseTests {
    @Test("safe rebase: content unchanged, byte-identical to qemu-img rebase, check clean", arguments: OpsRebaseCase.all)
    func safe(_ c: OpsRebaseCase) async throws {
        try await withTwin("rebase-" + c.name) { t in
            try await opsBuildRebaseChain(t.builder, topOptions: c.topOptions, candidates: c.args)
            try t.mirror()
            let r = try await t.both(["rebase"] + c.args + ["img.qcow2"], timeout: 180)
            opsExpectSameStatus(r, context: c.name)
            try #require(r.qemu.succeeded, "qemu-img rebase must succeed here: \(r.qemu)")
            guard r.ours.succeeded else { return }
            // orig.qcow2 still points at mid.qcow2: its content is the guest content before.
            try await wExpectIdentical("orig.qcow2", "img.qcow2", cwd: t.ours, context: c.name + " (guest content kept)")
            try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: c.name)
            try await opsExpectSameInfo(t, "img.qcow2", context: c.name)
            try await opsExpectSameLayout(t.o("img.qcow2"), t.q("img.qcow2"), cwd: t.root, context: c.name)
            try opsExpectSameBytes(t.o("img.qcow2"), t.q("img.qcow2"), maskSnapshotDates: false, context: c.name)
        }
    }

    @Test("unsafe rebase (-u) rewrites only the header, like qemu-img", arguments: OpsRebaseCase.unsafe)
    func unsafe(_ c: OpsRebaseCase) async throws {
        try await withTwin("rebase-u-" + c.name) { t in
            try await opsBuildRebaseChain(t.builder, topOptions: c.topOptions, candidates: c.args)
            try t.mirror()
            let r = try await t.both(["rebase"] + c.args + ["img.qcow2"])
            opsExpectSameStatus(r, context: c.name)
            try #require(r.qemu.succeeded, "qemu-img rebase -u must succeed here: \(r.qemu)")
            guard r.ours.succeeded else { return }
            try opsExpectSameBytes(t.o("img.qcow2"), t.q("img.qcow2"), maskSnapshotDates: false, context: c.name)
            // Backing fields as qemu-img reports them (without opening the backing file).
            let keys = ["backing-filename", "backing-filename-format", "full-backing-filename", "virtual-size", "format-specific"]
            func fields(_ dir: String) async throws -> String {
                let out = try await qemuImg(["info", "--output=json", "img.qcow2"], cwd: dir)
                    .replacingOccurrences(of: dir, with: "DIR")
                let o = try #require(try parseJSON(out, "qemu-img info") as? [String: Any])
                return canonicalJSON(o.filter { keys.contains($0.key) })
            }
            let a = try await fields(t.ours), b = try await fields(t.qemu)
            #expect(a == b, "\(c.name): qemu-img info backing fields differ:\nours: \(a)\nqemu: \(b)")
            if !c.args.contains("missing.qcow2") && !c.args.contains(where: { $0.hasPrefix("sub/") }) {
                try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: c.name)
            }
        }
    }

    @Test("refused like qemu-img: same exit code, image unchanged", arguments: OpsRebaseCase.refused)
    func refused(_ c: OpsRebaseCase) async throws {
        try await withTwin("rebase-bad-" + c.name) { t in
            try await opsBuildRebaseChain(t.builder, topOptions: c.topOptions, candidates: c.args)
            try t.mirror()
            let r = try await t.both(["rebase"] + c.args + ["img.qcow2"])
            opsExpectSameStatus(r, context: c.name)
            #expect(!r.qemu.succeeded)
            #expect(!r.ours.stderr.isEmpty, "\(c.name): no error message: \(r.ours)")
            #expect(try readFile(t.o("img.qcow2")) == readFile(t.o("orig.qcow2")), "\(c.name): a refused rebase changed our image")
        }
    }

    /// The new backing name is interpreted relative to the image's directory, as qemu-img does.
    @Test("image in a subdirectory: relative new backing name")
    func relativeNames() async throws {
        try await withTwin("rebase-rel") { t in
            let b = t.builder
            try b.mkdir("vm")
            try await b.create("base.qcow2", size: "2M")
            try await b.io("base.qcow2", ["write -P 1 0 2M"])
            try await b.create("other.qcow2", size: "2M")
            try await b.io("other.qcow2", ["write -P 2 1M 1M"])
            try await b.create("vm/img.qcow2", size: nil, backing: "../base.qcow2")
            try await b.io("vm/img.qcow2", ["write -P 3 0 64k"])
            try wCopy(b.path("vm/img.qcow2"), b.path("vm/orig.qcow2"))
            try t.mirror()
            let r = try await t.both(["rebase", "-b", "../other.qcow2", "-F", "qcow2", "vm/img.qcow2"])
            opsExpectSameStatus(r, context: "relative")
            guard r.ours.succeeded, r.qemu.succeeded else { return }
            try opsExpectSameBytes(t.o("vm/img.qcow2"), t.q("vm/img.qcow2"), maskSnapshotDates: false, context: "relative")
            try await wExpectIdentical("vm/orig.qcow2", "vm/img.qcow2", cwd: t.ours, context: "relative (content kept)")
            try await wExpectCleanCheck("vm/img.qcow2", cwd: t.ours, context: "relative")
        }
    }
}
