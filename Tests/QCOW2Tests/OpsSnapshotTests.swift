import Foundation
import Testing

// Internal snapshots: `qcow2 snapshot -l|-c|-a|-d` against `qemu-img snapshot` doing the
// same sequence on a copy (same file names in a twin directory). After every step: same exit
// code; byte-identical images except the snapshot dates; `qemu-img check` clean; `qcow2
// snapshot -l` prints exactly what `qemu-img snapshot -l` prints for our image, and that
// listing equals qemu-img's listing of its own copy (dates masked). At checkpoints every
// snapshot is read without applying it (`qcow2 convert -O raw -l NAME | -l snapshot.name=
// | -l snapshot.id= | -s ID`) and compared with `qemu-img convert -l` on qemu's copy, and
// `qemu-img snapshot -a` on a copy of our image must give the snapshot's content.

// MARK: - Steps and judges

/// Judges one `snapshot ARGS IMAGE` step run with both tools. When qemu-img refuses, ours
/// must refuse too (exit 1, a message) and leave its image unchanged and clean — or, where
/// qemu-img's failed run itself leaves its copy changed (leaked clusters), exactly as
/// qemu-img left it. When the images end up different the qemu copy is re-synchronised from
/// ours, so later steps are judged on their own.
@discardableResult
func opsSnapshotStep(_ t: OpsTwin, _ args: [String], image: String = "img.qcow2", context: String,
                     sourceLocation: SourceLocation = #_sourceLocation) async throws -> Bool {
    let ctx = "\(context): snapshot \(args.joined(separator: " "))"
    let before = try readFile(t.o(image))
    let r = try await t.both(["snapshot"] + args + [image])
    opsExpectSameStatus(r, context: ctx, sourceLocation: sourceLocation)
    var resync = r.ours.status != r.qemu.status
    var bytesDiffer = false
    if r.qemu.succeeded && r.ours.succeeded {
        if let d = try opsMaskedDifference(t.o(image), t.q(image)) {
            Issue.record("\(ctx): our image differs from qemu-img's (snapshot dates masked): \(d)", sourceLocation: sourceLocation)
            resync = true
            bytesDiffer = true
        }
        try await wExpectCleanCheck(image, cwd: t.ours, context: ctx, sourceLocation: sourceLocation)
    } else if !r.qemu.succeeded {
        #expect(!r.ours.stderr.isEmpty, "\(ctx): refused without a message: \(r.ours)", sourceLocation: sourceLocation)
        let changed = try readFile(t.o(image)) != before
        if !changed {
            try await wExpectCleanCheck(image, cwd: t.ours, context: ctx + " (refused)", sourceLocation: sourceLocation)
        } else if let d = try opsMaskedDifference(t.o(image), t.q(image)) {
            // Failing half-way is only acceptable where qemu-img leaves exactly the same image.
            Issue.record("\(ctx): a refused operation changed our image, and not the way qemu-img's failed run changed its copy: \(d)",
                         sourceLocation: sourceLocation)
            try await wExpectCleanCheck(image, cwd: t.ours, context: ctx + " (refused)", sourceLocation: sourceLocation)
        }
        // Continue from the state before the step (QEMU may leak clusters when it fails
        // half-way; a damaged image of ours is reported above, not in every later step).
        if changed { try writeFile(t.o(image), before) }
        resync = true
    }
    try await opsExpectSnapshotListings(t, image: image, context: ctx, sourceLocation: sourceLocation)
    if bytesDiffer || r.ours.status != r.qemu.status {
        // Identical bytes imply identical content; otherwise say whether the content differs too.
        let a = try await opsRaw(image, cwd: t.ours), b = try await opsRaw(image, cwd: t.qemu)
        if let d = opsFirstDifference(a, b) {
            Issue.record("\(ctx): guest content differs from qemu-img's result: \(d)", sourceLocation: sourceLocation)
        }
    }
    if resync { try t.mirror(image) }
    return r.ours.succeeded
}

/// `qcow2 snapshot -l` == `qemu-img snapshot -l` on our image (exactly), and qemu-img lists
/// our image like its own copy (dates masked).
func opsExpectSnapshotListings(_ t: OpsTwin, image: String, context: String,
                               sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let qOnOurs = try await run("qemu-img", ["snapshot", "-l", image], cwd: t.ours)
    let ours = try await qcow2(["snapshot", "-l", image], cwd: t.ours)
    expectSane(ours, sourceLocation: sourceLocation)
    #expect(ours.status == qOnOurs.status, "\(context): snapshot -l exit: \(ours) vs \(qOnOurs)", sourceLocation: sourceLocation)
    #expect(ours.stdout == qOnOurs.stdout,
            "\(context): `qcow2 snapshot -l` differs from `qemu-img snapshot -l` on the same image:\nours:\n\(ours.stdout)\nqemu-img:\n\(qOnOurs.stdout)",
            sourceLocation: sourceLocation)
    let qOnQemu = try await run("qemu-img", ["snapshot", "-l", image], cwd: t.qemu)
    #expect(opsMaskDates(qOnOurs.stdout) == opsMaskDates(qOnQemu.stdout),
            "\(context): snapshot tables differ (dates masked):\nours:\n\(qOnOurs.stdout)\nqemu-img's:\n\(qOnQemu.stdout)",
            sourceLocation: sourceLocation)
}

/// Reads every snapshot of our image without applying it, in every addressing form our
/// convert accepts, against `qemu-img convert -l` on qemu's copy (`-s ID` is judged against
/// `-l snapshot.id=ID`; qemu-img 7.2 has no `-s`). Then applies each snapshot with qemu-img
/// on a scratch copy of our image: the content must be the snapshot's, and check clean.
func opsExpectSnapshotReads(_ t: OpsTwin, image: String = "img.qcow2", allForms: Bool = true, context: String,
                            sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let snaps = try await opsSnapshots(image, cwd: t.ours)
    for (id, name) in snaps {
        let forms: [(ours: [String], qemu: String)] = allForms ? [
            (["-l", name], name),
            (["-l", "snapshot.name=\(name)"], "snapshot.name=\(name)"),
            (["-l", "snapshot.id=\(id)"], "snapshot.id=\(id)"),
            (["-s", id], "snapshot.id=\(id)"),
            (["-l", "snapshot.id=\(id),snapshot.name=\(name)"], "snapshot.id=\(id),snapshot.name=\(name)"),
        ] : [(["-l", name], name)]
        for f in forms {
            let ctx = "\(context): convert \(f.ours.joined(separator: " ")) (snapshot \(id) '\(name)')"
            let qScratch = "q-\(UUID().uuidString.prefix(6)).raw"
            let q = try await run("qemu-img", ["convert", "-O", "raw", "-l", f.qemu, image, qScratch], cwd: t.qemu)
            let oScratch = "o-\(UUID().uuidString.prefix(6)).raw"
            let o = try await qcow2(["convert", "-O", "raw"] + f.ours + [image, oScratch], cwd: t.ours)
            defer {
                try? FileManager.default.removeItem(atPath: t.q(qScratch))
                try? FileManager.default.removeItem(atPath: t.o(oScratch))
            }
            expectSane(o, sourceLocation: sourceLocation)
            #expect(o.status == q.status, "\(ctx): exit: ours \(o) vs qemu-img \(q)", sourceLocation: sourceLocation)
            guard o.succeeded, q.succeeded else { continue }
            if let d = opsFirstDifference([UInt8](try readFile(t.o(oScratch))), [UInt8](try readFile(t.q(qScratch)))) {
                Issue.record("\(ctx): snapshot content differs from qemu-img's: \(d)", sourceLocation: sourceLocation)
            }
        }
        // qemu-img reads our snapshot as it reads its own copy's.
        let expected = try await opsRaw(image, cwd: t.qemu, snapshotArg: "snapshot.id=\(id)")
        let viaQemu = try await opsRaw(image, cwd: t.ours, snapshotArg: "snapshot.id=\(id)")
        if let d = opsFirstDifference(viaQemu, expected) {
            Issue.record("\(context): qemu-img reads our snapshot \(id) differently from its own: \(d)", sourceLocation: sourceLocation)
        }
        // `qemu-img snapshot -a` on a copy of our image gives what it gives on a copy of its own.
        let applied = "applied-\(id).qcow2"
        try wCopy(t.o(image), t.o(applied))
        try wCopy(t.q(image), t.q(applied))
        defer {
            try? FileManager.default.removeItem(atPath: t.o(applied))
            try? FileManager.default.removeItem(atPath: t.q(applied))
        }
        let aq = try await run("qemu-img", ["snapshot", "-a", id, applied], cwd: t.qemu)
        let ao = try await run("qemu-img", ["snapshot", "-a", id, applied], cwd: t.ours)
        #expect(ao.status == aq.status, "\(context): `qemu-img snapshot -a \(id)` on our image: \(ao)\non its own: \(aq)",
                sourceLocation: sourceLocation)
        guard ao.succeeded, aq.succeeded else { continue } // e.g. 2-bit refcounts overflow in QEMU too
        let want = try await opsRaw(applied, cwd: t.qemu)
        if let d = opsFirstDifference(try await opsRaw(applied, cwd: t.ours), want) {
            Issue.record("\(context): after `qemu-img snapshot -a \(id)` on our image the content is not the snapshot's: \(d)",
                         sourceLocation: sourceLocation)
        }
        try await wExpectCleanCheck(applied, cwd: t.ours, context: "\(context): qemu-img applied our snapshot \(id)",
                                    sourceLocation: sourceLocation)
    }
}

// MARK: - Scenario matrix

struct OpsSnapCase: Sendable, CustomTestStringConvertible {
    var name: String
    var options: String?
    var clusterSize: Int
    var size: Int = 4 << 20
    /// The image is an overlay over base.qcow2 (which has data of its own).
    var backing = false
    /// The writes between snapshot steps are made by `qcow2 io` on our copy (and qemu-io on
    /// qemu's) instead of qemu-io on both: exercises our copy-on-write of shared clusters.
    var ourWrites = false
    /// compat=0.10 has no zero clusters and no compressed-cluster restrictions differ.
    var v2 = false
    var testDescription: String { name }

    static let all: [OpsSnapCase] = [
        OpsSnapCase(name: "default 64k", options: nil, clusterSize: 65536),
        OpsSnapCase(name: "default 64k, writes by qcow2 io", options: nil, clusterSize: 65536, ourWrites: true),
        OpsSnapCase(name: "cluster_size=512, writes by qcow2 io", options: "cluster_size=512", clusterSize: 512, size: 1 << 20, ourWrites: true),
        OpsSnapCase(name: "extended_l2 32k, writes by qcow2 io", options: "extended_l2=on,cluster_size=32k", clusterSize: 32768, ourWrites: true),
        OpsSnapCase(name: "compat=0.10", options: "compat=0.10", clusterSize: 65536, v2: true),
        OpsSnapCase(name: "refcount_bits=2 (compressed clusters are already shared: the first snapshot overflows)", options: "refcount_bits=2", clusterSize: 65536),
        OpsSnapCase(name: "refcount_bits=64", options: "refcount_bits=64,cluster_size=4k", clusterSize: 4096, size: 2 << 20),
        OpsSnapCase(name: "lazy_refcounts=on", options: "lazy_refcounts=on", clusterSize: 65536),
        OpsSnapCase(name: "compression_type=zstd 16k", options: "compression_type=zstd,cluster_size=16k", clusterSize: 16384, size: 2 << 20),
        OpsSnapCase(name: "overlay with a backing file", options: nil, clusterSize: 65536, backing: true),
        OpsSnapCase(name: "overlay, compat=0.10, writes by qcow2 io", options: "compat=0.10", clusterSize: 65536, backing: true,
                    ourWrites: true, v2: true),
    ]
}

extension OpsSnapCase {
    /// Data, compressed clusters, zero clusters, a partial write and the last cluster.
    var initialWrites: [String] {
        let c = clusterSize
        return [
            "write -P 0x11 0 \(4 * c)",
            "write -c -P 0x22 \(4 * c) \(2 * c)",
            "write -z \(6 * c) \(c)",
            "write -P 0x44 \(8 * c + 100) \(max(600, c / 2))",
            "write -P 0x33 \(size - c) \(c)",
        ]
    }
    /// Copy-on-write over shared clusters: a write across two shared clusters, a zero write
    /// over shared data, a discard of a shared compressed cluster, a small write into a
    /// shared compressed cluster, a write to a fresh area.
    var writesAfterFirstSnapshot: [String] {
        let c = clusterSize
        return [
            "write -P 0x55 \(c / 2) \(c)",
            "write -z \(2 * c) \(c)",
            "discard \(4 * c) \(c)",
            "write -P 0x66 \(5 * c + 512) 512",
            "write -P 0x67 \(size / 2) \(3 * c)",
        ]
    }
    var writesAfterApply: [String] {
        let c = clusterSize
        return [
            "write -P 0x77 0 \(3 * c)",
            "write -z \(size / 2 + c) \(c)",
            "write -P 0x78 \(size - 2 * c - 700) \(c + 600)",
        ]
    }

    func write(_ t: OpsTwin, _ commands: [String], context: String) async throws {
        if ourWrites {
            let r = try await wOurIO("img.qcow2", commands, cwd: t.ours)
            expectSane(r)
            #expect(wIOClean(r), "\(context): qcow2 io failed: \(r)")
            try await qemuIO("img.qcow2", commands, cwd: t.qemu)
            try opsExpectSameBytes(t.o("img.qcow2"), t.q("img.qcow2"), context: context + " (qcow2 io vs qemu-io writes)")
            try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: context + " (after qcow2 io)")
            try t.mirror("img.qcow2")
        } else {
            try await t.qemuIOBoth("img.qcow2", commands)
        }
    }
}

@Suite("Ops: internal snapshots")
struct OpsSnapshotTests {
    @Test("snapshot -c/-l/-a/-d sequence == qemu-img snapshot (bytes modulo dates, check, list, reads)",
          arguments: OpsSnapCase.all)
    func sequence(_ c: OpsSnapCase) async throws {
        try await withTwin("snap-" + c.name) { t in
            let b = t.builder
            if c.backing {
                try await b.create("base.qcow2", size: String(c.size), options: c.v2 ? "compat=0.10" : nil)
                try await b.io("base.qcow2", ["write -P 0xb0 0 \(c.size)", "write -z \(c.clusterSize * 7) \(c.clusterSize * 3)"])
                try await b.create("img.qcow2", size: nil, options: c.options, backing: "base.qcow2")
            } else {
                try await b.create("img.qcow2", size: String(c.size), options: c.options)
            }
            try await b.io("img.qcow2", c.initialWrites)
            try t.mirror()
            let ctx = c.name

            try await opsSnapshotStep(t, ["-l"], context: ctx)
            try await opsSnapshotStep(t, ["-c", "first"], context: ctx)
            try await c.write(t, c.writesAfterFirstSnapshot, context: ctx + " after first")
            try await opsSnapshotStep(t, ["-c", "second"], context: ctx)
            try await opsExpectSnapshotReads(t, allForms: false, context: ctx + " [two snapshots]")
            try await opsSnapshotStep(t, ["-a", "first"], context: ctx)
            try await c.write(t, c.writesAfterApply, context: ctx + " after apply")
            try await opsSnapshotStep(t, ["-c", "third"], context: ctx)
            try await opsSnapshotStep(t, ["-a", "2"], context: ctx) // by ID
            try await opsSnapshotStep(t, ["-c", "second"], context: ctx) // duplicate name, new ID
            try await opsExpectSnapshotReads(t, context: ctx + " [four snapshots]")
            try await opsSnapshotStep(t, ["-d", "first"], context: ctx)
            try await opsSnapshotStep(t, ["-a", "third"], context: ctx)
            try await c.write(t, c.writesAfterFirstSnapshot, context: ctx + " after third")
            try await opsSnapshotStep(t, ["-d", "third"], context: ctx)
            try await opsSnapshotStep(t, ["-d", "second"], context: ctx) // the first of two with this name
            try await opsSnapshotStep(t, ["-a", "nosuch"], context: ctx)
            try await opsSnapshotStep(t, ["-d", "nosuch"], context: ctx)
            try await opsExpectSnapshotReads(t, allForms: false, context: ctx + " [end]")
            try await opsSnapshotStep(t, ["-d", "second"], context: ctx)
            // No snapshots left: the image must still be what qemu-img made of it.
            try await opsSnapshotStep(t, ["-l"], context: ctx + " [none left]")
        }
    }

    @Test("QEMU-created snapshots are listed, read, applied and deleted like qemu-img does")
    func qemuCreated() async throws {
        try await withTwin("snap-qemu-made") { t in
            let b = t.builder
            try await b.create("img.qcow2", size: "8M")
            try await b.io("img.qcow2", ["write -P 0x11 0 2M", "write -c -P 0x12 2M 256k", "write -z 3M 64k"])
            try await b.img(["snapshot", "-c", "alpha", "img.qcow2"])
            try await b.io("img.qcow2", ["write -P 0x21 64k 64k", "write -P 0x22 5M 1M", "discard 2M 64k"])
            try await b.img(["snapshot", "-c", "beta", "img.qcow2"])
            try await b.io("img.qcow2", ["write -z 0 1M", "write -P 0x31 7M 1M"])
            try await b.img(["snapshot", "-c", "gamma", "img.qcow2"])
            try await b.img(["snapshot", "-d", "beta", "img.qcow2"])
            try await b.io("img.qcow2", ["write -P 0x41 100k 300k"])
            try t.mirror()
            let ctx = "qemu-made"
            try await opsSnapshotStep(t, ["-l"], context: ctx)
            try await opsExpectSnapshotReads(t, context: ctx)
            try await opsSnapshotStep(t, ["-a", "alpha"], context: ctx)
            try await opsSnapshotStep(t, ["-a", "3"], context: ctx)
            try await opsSnapshotStep(t, ["-c", "ours"], context: ctx)
            try await opsSnapshotStep(t, ["-d", "alpha"], context: ctx)
            try await opsExpectSnapshotReads(t, allForms: false, context: ctx + " [after]")
            try await opsSnapshotStep(t, ["-d", "gamma"], context: ctx)
            try await opsSnapshotStep(t, ["-d", "ours"], context: ctx)
        }
    }

    /// Names that look like other snapshots' IDs. QEMU's rules: `-a X` and `convert -l X`
    /// try X as an ID first, then as a name; `snapshot -d X` matches names only;
    /// `-l snapshot.name=X` matches names only, `-l snapshot.id=X` IDs only, and both
    /// together must match the same snapshot.
    @Test("IDs and names that collide are resolved like qemu-img")
    func idNameCollisions() async throws {
        try await withTwin("snap-collide") { t in
            let b = t.builder
            try await b.create("img.qcow2", size: "1M")
            // IDs 1,2,3 named "3","2","1"; each with its own content byte.
            for i in 1...3 {
                try await b.io("img.qcow2", ["write -P \(i) 0 64k"])
                try await b.img(["snapshot", "-c", String(4 - i), "img.qcow2"])
            }
            try await b.io("img.qcow2", ["write -P 9 0 64k"])
            try t.mirror()
            let ctx = "collisions"
            try await opsExpectSnapshotReads(t, context: ctx)
            // Reads that must fail, as in qemu-img: the ID and the name name different snapshots.
            for spec in ["snapshot.id=1,snapshot.name=1", "snapshot.id=3,snapshot.name=3", "snapshot.name=4", "snapshot.id=4", "4"] {
                let q = try await run("qemu-img", ["convert", "-O", "raw", "-l", spec, "img.qcow2", "q.raw"], cwd: t.qemu)
                let o = try await qcow2(["convert", "-O", "raw", "-l", spec, "img.qcow2", "o.raw"], cwd: t.ours)
                expectSane(o)
                #expect(o.status == q.status, "\(ctx): convert -l \(spec): ours \(o) vs qemu-img \(q)")
                if o.succeeded && q.succeeded {
                    #expect(try readFile(t.o("o.raw")) == readFile(t.q("q.raw")), "\(ctx): convert -l \(spec) content differs")
                }
            }
            for arg in ["1", "3", "2"] {
                try t.mirror()
                try await opsSnapshotStep(t, ["-a", arg], context: ctx + " apply")
            }
            for arg in ["1", "3"] {
                try t.mirror()
                try await opsSnapshotStep(t, ["-d", arg], context: ctx + " delete")
            }
        }
    }

    /// Names are byte strings in QEMU: a new name is kept up to 255 bytes (qemu-img copies
    /// it into `QEMUSnapshotInfo.name[256]`), non-ASCII names are stored as their UTF-8
    /// bytes and listed raw, and -a/-d find them by those bytes.
    @Test("long and non-ASCII names: stored, listed and found like qemu-img")
    func longAndNonASCIINames() async throws {
        try await withTwin("snap-names") { t in
            try await t.builder.create("img.qcow2", size: "1M")
            try t.mirror()
            let long = String(repeating: "n", count: 300), accents = "snäpshot-ü✓"
            let ctx = "names"
            try await opsSnapshotStep(t, ["-c", long], context: ctx)
            try await opsSnapshotStep(t, ["-c", accents], context: ctx)
            let ours = try await qcow2Bytes(["snapshot", "-l", "img.qcow2"], cwd: t.ours)
            let qemu = try await qemuImgBytes(["snapshot", "-l", "img.qcow2"], cwd: t.qemu)
            // Dates differ between the two copies: compare the ID and TAG columns.
            func names(_ b: [UInt8]) -> [[ArraySlice<UInt8>]] {
                b.split(separator: 10).dropFirst(2).map { Array($0.split(separator: 0x20).prefix(2)) }
            }
            #expect(names(ours) == names(qemu), "snapshot -l: ours\n\(String(decoding: ours, as: UTF8.self))\nqemu-img\n\(String(decoding: qemu, as: UTF8.self))")
            #expect(String(decoding: ours, as: UTF8.self).contains(String(repeating: "n", count: 255) + " "))
            try await opsSnapshotStep(t, ["-a", accents], context: ctx)
            try await opsSnapshotStep(t, ["-d", String(repeating: "n", count: 255)], context: ctx)
            try await opsSnapshotStep(t, ["-d", accents], context: ctx)
        }
    }

    @Test("-d by ID where no snapshot has that name: qemu-img refuses (names only)")
    func deleteByIDOnly() async throws {
        try await withTwin("snap-del-id") { t in
            let b = t.builder
            try await b.create("img.qcow2", size: "1M")
            try await b.io("img.qcow2", ["write -P 1 0 64k"])
            try await b.img(["snapshot", "-c", "s1", "img.qcow2"])
            try await b.img(["snapshot", "-c", "s2", "img.qcow2"])
            try t.mirror()
            try await opsSnapshotStep(t, ["-d", "1"], context: "-d 1 (ID of 's1')")
        }
    }

    /// A snapshot taken at 1 MiB, the image grown to 3 MiB (by qemu-img on both copies, so
    /// only the snapshot operations differ), data written past the old end, a second
    /// snapshot; applying the small one must shrink the virtual size back (QEMU truncates the
    /// active layer first, copying the shared L2 table), applying the big one must grow it.
    @Test("apply a snapshot taken at a different virtual size")
    func applyAcrossResize() async throws {
        for opts in [nil, "cluster_size=512", "extended_l2=on,cluster_size=16k"] as [String?] {
            try await withTwin("snap-resize") { t in
                let b = t.builder
                let ctx = "resize between snapshots (\(opts ?? "default"))"
                try await b.create("img.qcow2", size: "1M", options: opts)
                try await b.io("img.qcow2", ["write -P 1 0 1M"])
                try t.mirror()
                try await opsSnapshotStep(t, ["-c", "small"], context: ctx)
                for dir in [t.ours, t.qemu] { try await qemuImg(["resize", "img.qcow2", "3M"], cwd: dir) }
                try await t.qemuIOBoth("img.qcow2", ["write -P 2 2M 1M", "write -P 3 512k 4k"])
                try await opsSnapshotStep(t, ["-c", "big"], context: ctx)
                try await opsExpectSnapshotReads(t, context: ctx)
                try await opsSnapshotStep(t, ["-a", "small"], context: ctx)
                let small = try await opsInfo("img.qcow2", cwd: t.ours)
                #expect((small["virtual-size"] as? NSNumber)?.intValue == 1 << 20, "\(ctx): virtual size after applying 'small': \(small)")
                try await opsSnapshotStep(t, ["-a", "big"], context: ctx)
                let big = try await opsInfo("img.qcow2", cwd: t.ours)
                #expect((big["virtual-size"] as? NSNumber)?.intValue == 3 << 20, "\(ctx): virtual size after applying 'big': \(big)")
                try await opsSnapshotStep(t, ["-a", "small"], context: ctx)
                try await opsSnapshotStep(t, ["-d", "big"], context: ctx)
                try await opsExpectSnapshotReads(t, context: ctx + " [end]")
            }
        }
    }

    @Test("refcount_bits=1: creating a snapshot fails cleanly (exit 1, image unchanged and clean)")
    func refcountBits1() async throws {
        try await withTwin("snap-rc1") { t in
            let b = t.builder
            try await b.create("img.qcow2", size: "4M", options: "refcount_bits=1")
            try await b.io("img.qcow2", ["write -P 1 0 256k", "write -c -P 2 1M 64k"])
            try t.mirror()
            // Succeeds in qemu-img only when nothing is shared yet; here data exists.
            let ok = try await opsSnapshotStep(t, ["-c", "s"], context: "refcount_bits=1")
            #expect(!ok, "creating a snapshot with 1-bit refcounts over data must fail")
            // An empty image can be snapshotted (nothing to share) in qemu-img; same for us.
            try await b.create("empty.qcow2", size: "1M", options: "refcount_bits=1")
            try t.mirror("empty.qcow2")
            try await opsSnapshotStep(t, ["-c", "s"], image: "empty.qcow2", context: "refcount_bits=1, empty image")
        }
    }

    /// 1000 `qcow2 snapshot -c` in a row (a bash loop timing each create with
    /// EPOCHREALTIME, so the measurement is not our process-spawning overhead): the last
    /// 100 creates must not be dramatically slower than the first 100 (median, 5x plus a
    /// small constant), and the image must stay clean and list like qemu-img lists it.
    @Test("1000 snapshots created one by one stay fast and clean")
    func thousandSnapshots() async throws {
        try await withTempDir("snap-1000") { dir in
            let b = ImageBuilder(dir: dir)
            try await b.create("img.qcow2", size: "16M")
            try await b.io("img.qcow2", ["write -P 0x5a 0 2M", "write -c -P 0x5b 4M 256k"])
            let script = """
                for i in $(seq 1 1000); do
                  s=$EPOCHREALTIME
                  "$0" snapshot -c "snap$i" img.qcow2 || { echo "FAILED $i" >&2; exit 1; }
                  e=$EPOCHREALTIME
                  echo "$s $e"
                done > times.txt
                """
            let r = try await run("bash", ["-c", script, QCOW2Binary.path], cwd: dir, timeout: 600)
            try #require(r.succeeded, "the create loop failed: \(r)")
            let times = try String(contentsOfFile: dir + "/times.txt", encoding: .utf8).split(separator: "\n").map { line -> Double in
                let f = line.split(separator: " ").compactMap { Double($0) }
                return f.count == 2 ? f[1] - f[0] : 0
            }
            try #require(times.count == 1000, "expected 1000 timings, got \(times.count)")
            let first = opsMedian(Array(times[0..<100])), last = opsMedian(Array(times[900..<1000]))
            #expect(last <= 5 * first + 0.05,
                    "creating snapshots 901..1000 takes \(last) s each (median) vs \(first) s for 1..100: more than 5x slower")
            try await wExpectCleanCheck("img.qcow2", cwd: dir, context: "after 1000 snapshots")
            let list = try await qcow2(["snapshot", "-l", "img.qcow2"], cwd: dir)
            let qList = try await qemuImg(["snapshot", "-l", "img.qcow2"], cwd: dir)
            #expect(list.stdout == qList, "snapshot -l of 1000 snapshots differs from qemu-img's")
            #expect(qList.split(separator: "\n").count == 1002, "qemu-img lists \(qList.split(separator: "\n").count - 2) snapshots")
            let snap = try await opsRaw("img.qcow2", cwd: dir, snapshotArg: "snap500")
            let now = try await opsRaw("img.qcow2", cwd: dir)
            #expect(snap == now, "snapshot 500 does not hold the image content")
        }
    }
}
