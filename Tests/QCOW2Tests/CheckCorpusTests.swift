import Foundation
import Testing

// `qcow2 check` against `qemu-img check` on a corpus of images made by qemu-img/qemu-io,
// clean ones of several kinds and deliberately corrupted ones (one per category of the
// format doc §14.4), each corrupted by patching bytes in the test.
//
// For every image: the exit code, the JSON report (text and counts) and the messages of
// `qcow2 check` equal those of `qemu-img check`, in JSON and human output. Then, for
// `-r leaks` and `-r all`, on two copies: qemu-img repairs one and we repair the other; our
// output and the repaired file equal qemu-img's (byte for byte) except for the few cases
// where we repair differently on purpose (listed per case), `qemu-img check` judges our
// repaired copy exactly as it judges its own, our own check agrees with it (one pass
// converges), and the guest data is what qemu-img's repair leaves, and, where the
// corruption did not touch guest data, what the image held before it was corrupted.

/// One corpus image.
struct CheckCase: Sendable, CustomTestStringConvertible {
    var name: String
    /// Creates `img.qcow2` in the directory (and `pristine.qcow2`, a copy before the
    /// corruption, when the case compares guest data with it).
    var build: @Sendable (ImageBuilder, CkImage) async throws -> Void
    /// After `-r all`, the guest data equals `pristine.qcow2`'s.
    var dataIntact = false
    /// Repair modes where our repair deliberately differs from qemu-img's, with the exit code
    /// `qemu-img check` must give on our repaired copy.
    var ownRepair: [String: Int32] = [:]
    /// Repair modes where the output is qemu-img's but the file is not byte-identical.
    var bytesDiffer: Set<String> = []

    var testDescription: String { name }
}

// MARK: - Base images

enum CkBase {
    /// 64 MiB, 64 KiB clusters: data clusters 0–3, a preallocated zero cluster (4) and a
    /// compressed cluster (16) in the first L2 table.
    static func standard(_ b: ImageBuilder, pristine: Bool = false) async throws {
        try await b.create("img.qcow2", size: "64M")
        try await b.io("img.qcow2", ["write -P 1 0 320k", "write -z 256k 64k", "write -c -P 3 1M 64k"])
        if pristine { try ckCopy(b.path("img.qcow2"), b.path("pristine.qcow2")) }
    }

    /// One internal snapshot; the active L2 table shares clusters with it.
    static func snapshot(_ b: ImageBuilder, pristine: Bool = false) async throws {
        try await b.create("img.qcow2", size: "64M")
        try await b.io("img.qcow2", ["write -P 1 0 256k"])
        try await b.img(["snapshot", "-c", "snap1", "img.qcow2"])
        try await b.io("img.qcow2", ["write -P 2 64k 64k"])
        if pristine { try ckCopy(b.path("img.qcow2"), b.path("pristine.qcow2")) }
    }

    /// Extended L2 entries: an allocated cluster, a partly written one, a zero cluster (2)
    /// and a compressed one (16).
    static func extendedL2(_ b: ImageBuilder, pristine: Bool = false) async throws {
        try await b.create("img.qcow2", size: "64M", options: "extended_l2=on")
        try await b.io("img.qcow2", ["write -P 1 0 64k", "write -P 2 64k 4k", "write -z 128k 64k", "write -c -P 3 1M 64k"])
        if pristine { try ckCopy(b.path("img.qcow2"), b.path("pristine.qcow2")) }
    }

    /// External data file `img.raw`.
    static func dataFile(_ b: ImageBuilder) async throws {
        try await b.create("img.qcow2", size: "16M", options: "data_file=img.raw")
        try await b.io("img.qcow2", ["write -P 1 0 128k", "write -z 1M 64k"])
    }
}

private func standard(_ name: String, dataIntact: Bool = false, ownRepair: [String: Int32] = [:],
                      _ corrupt: @escaping @Sendable (CkImage) throws -> Void) -> CheckCase {
    CheckCase(name: name, build: { b, img in
        try await CkBase.standard(b, pristine: dataIntact)
        try corrupt(img)
    }, dataIntact: dataIntact, ownRepair: ownRepair)
}

private func withSnapshot(_ name: String, dataIntact: Bool = false, ownRepair: [String: Int32] = [:],
                          _ corrupt: @escaping @Sendable (CkImage) throws -> Void) -> CheckCase {
    CheckCase(name: name, build: { b, img in
        try await CkBase.snapshot(b, pristine: dataIntact)
        try corrupt(img)
    }, dataIntact: dataIntact, ownRepair: ownRepair)
}

private func extended(_ name: String, dataIntact: Bool = false, _ corrupt: @escaping @Sendable (CkImage) throws -> Void) -> CheckCase {
    CheckCase(name: name, build: { b, img in
        try await CkBase.extendedL2(b, pristine: dataIntact)
        try corrupt(img)
    }, dataIntact: dataIntact)
}

private let copied = CkImage.copied
private let compressedFlag: UInt64 = 1 << 62

let checkCorpus: [CheckCase] = [
    // MARK: Clean images of several kinds
    CheckCase(name: "clean: data, zero and compressed clusters", build: { b, _ in try await CkBase.standard(b) }),
    CheckCase(name: "clean: extended L2 entries", build: { b, _ in try await CkBase.extendedL2(b) }),
    CheckCase(name: "clean: 512-byte clusters, refcount_bits=1", build: { b, _ in
        try await b.create("img.qcow2", size: "4M", options: "cluster_size=512,refcount_bits=1")
        try await b.io("img.qcow2", ["write -P 1 0 64k", "write -c -P 2 1M 4k", "write -z 2M 4k"])
    }),
    CheckCase(name: "clean: 512-byte clusters, refcount_bits=64, internal snapshot", build: { b, _ in
        try await b.create("img.qcow2", size: "4M", options: "cluster_size=512,refcount_bits=64")
        try await b.io("img.qcow2", ["write -P 1 0 64k", "write -c -P 2 1M 4k"])
        try await b.img(["snapshot", "-c", "s1", "img.qcow2"])
        try await b.io("img.qcow2", ["write -P 5 0 4k"])
    }),
    CheckCase(name: "clean: internal snapshots created and deleted", build: { b, _ in
        try await b.create("img.qcow2", size: "64M")
        for i in 1...3 {
            try await b.io("img.qcow2", ["write -P \(i) \(i * 64)k 128k"])
            try await b.img(["snapshot", "-c", "snap\(i)", "img.qcow2"])
        }
        try await b.img(["snapshot", "-d", "snap2", "img.qcow2"])
    }),
    // qemu-img opens the image read-write for a repair and, on closing it, stores the
    // bitmaps anew (new tables and directory): its file differs for reasons unrelated to
    // the check, so only the verdicts and the guest data are compared.
    CheckCase(name: "clean: persistent dirty bitmaps", build: { b, _ in
        try await b.create("img.qcow2", size: "64M")
        try await b.io("img.qcow2", ["write -P 1 0 1M"])
        try await b.img(["bitmap", "--add", "img.qcow2", "b0"])
        try await b.img(["bitmap", "--add", "-g", "65536", "img.qcow2", "b1"])
        try await b.io("img.qcow2", ["write -P 3 0 64k"])
    }, ownRepair: ["leaks": 0, "all": 0]),
    CheckCase(name: "clean: backing chain", build: { b, _ in
        try await b.create("base.qcow2", size: "64M")
        try await b.io("base.qcow2", ["write -P 1 0 1M"])
        try await b.img(["snapshot", "-c", "s", "base.qcow2"])
        try await b.create("img.qcow2", size: nil, backing: "base.qcow2")
        try await b.io("img.qcow2", ["write -P 9 100k 10k"])
    }),
    CheckCase(name: "clean: external data file", build: { b, _ in try await CkBase.dataFile(b) }),
    CheckCase(name: "clean: compat=0.10 with a snapshot and a compressed cluster", build: { b, _ in
        try await b.create("img.qcow2", size: "64M", options: "compat=0.10")
        try await b.io("img.qcow2", ["write -P 1 0 1M", "write -c -P 2 4M 64k"])
        try await b.img(["snapshot", "-c", "s1", "img.qcow2"])
    }),
    CheckCase(name: "clean: zstd compressed clusters", build: { b, _ in
        try await b.create("img.qcow2", size: "64M", options: "compression_type=zstd")
        try await b.io("img.qcow2", ["write -c -P 1 0 1M"])
    }),

    // MARK: Refcounts
    standard("refcount 0 for a referenced cluster", dataIntact: true) { img in
        try img.set16(try img.refcount16(6), 0)
    },
    standard("refcount lower than the references (two entries, one cluster)") { img in
        try img.set64(try img.l2Entry(1), try img.u64(try img.l2Entry(0)))
    },
    standard("refcount higher than the references (leak)", dataIntact: true) { img in
        try img.set16(try img.refcount16(5), 3)
    },
    CheckCase(name: "refcount overflow with refcount_bits=1", build: { b, img in
        try await b.create("img.qcow2", size: "4M", options: "cluster_size=512,refcount_bits=1")
        try await b.io("img.qcow2", ["write -P 1 0 64k"])
        try img.set64(try img.l2Entry(1), try img.u64(try img.l2Entry(0)))
    }),
    CheckCase(name: "lazy refcounts: crash before the refcount updates (dirty)", build: { b, _ in
        try await b.create("img.qcow2", size: "64M", options: "lazy_refcounts=on")
        // qemu-io dies on SIGABRT here, leaving the dirty bit set and refcounts missing.
        _ = try await run("qemu-io", ["-c", "write -P 1 0 1M", "-c", "write -P 2 8M 64k", "-c", "abort", "img.qcow2"],
                          cwd: b.dir, timeout: 60)
    }, bytesDiffer: ["leaks"]),
    standard("dirty bit on a consistent image", dataIntact: true) { img in try img.set64(72, 1) },
    standard("corrupt bit on a consistent image", dataIntact: true) { img in try img.set64(72, 2) },

    // MARK: References outside the image or unaligned
    standard("data cluster past the end of the file") { img in
        try img.set64(try img.l2Entry(0), copied | 0x1_0000_0000)
    },
    standard("data cluster near the largest host offset") { img in
        try img.set64(try img.l2Entry(0), copied | 0x00FF_FFFF_FFFF_0000)
    },
    standard("L2 table past the end of the file") { img in
        try img.set64(try img.l1Entry(0), copied | 0x1_0000_0000)
    },
    standard("data cluster not aligned") { img in
        try img.set64(try img.l2Entry(0), try img.u64(try img.l2Entry(0)) + 0x200)
    },
    standard("preallocated zero cluster not aligned", dataIntact: true) { img in
        try img.set64(try img.l2Entry(4), try img.u64(try img.l2Entry(4)) + 0x200)
    },
    standard("L2 table not aligned") { img in
        try img.set64(try img.l1Entry(0), try img.u64(try img.l1Entry(0)) + 0x200)
    },

    // MARK: Reserved bits
    standard("L1 entry with reserved bits") { img in
        try img.set64(try img.l1Entry(0), try img.u64(try img.l1Entry(0)) | 2)
    },
    standard("L2 entry with reserved bits") { img in
        try img.set64(try img.l2Entry(0), try img.u64(try img.l2Entry(0)) | 2)
    },

    // MARK: Copied flags
    standard("copied flag missing on a data cluster", dataIntact: true) { img in
        try img.set64(try img.l2Entry(0), try img.u64(try img.l2Entry(0)) & ~copied)
    },
    standard("copied flag missing on an L1 entry", dataIntact: true) { img in
        try img.set64(try img.l1Entry(0), try img.u64(try img.l1Entry(0)) & ~copied)
    },
    withSnapshot("copied flag on a cluster shared with a snapshot", dataIntact: true) { img in
        try img.set64(try img.l2Entry(0), try img.u64(try img.l2Entry(0)) | copied)
    },

    // MARK: Metadata overlapping metadata (shows as refcount mismatches)
    CheckCase(name: "two L1 entries share one L2 table", build: { b, img in
        try await b.create("img.qcow2", size: "2G")
        try await b.io("img.qcow2", ["write -P 1 0 64k", "write -P 2 512M 64k"])
        try img.set64(try img.l1Entry(1), try img.u64(try img.l1Entry(0)))
    }),
    standard("data cluster overlaps the L1 table") { img in
        try img.set64(try img.l2Entry(1), copied | (try img.l1Table))
    },
    standard("data cluster overlaps its own L2 table") { img in
        try img.set64(try img.l2Entry(0), copied | (try img.l2Table()))
    },

    // MARK: Compressed descriptors
    standard("compressed cluster with the copied flag") { img in
        try img.set64(try img.l2Entry(16), try img.u64(try img.l2Entry(16)) | copied)
    },
    standard("compressed cluster past the end of the file") { img in
        try img.set64(try img.l2Entry(16), compressedFlag | 0x1_0000_0000)
    },
    CheckCase(name: "compressed cluster in an image with a data file", build: { b, img in
        try await CkBase.dataFile(b)
        try img.set64(try img.l2Entry(0), compressedFlag)
    }),

    // MARK: Extended L2 bitmaps
    extended("extended L2: allocated and zero bit on one subcluster") { img in
        try img.set64(try img.l2Entry(0, entrySize: 16) + 8, 0x0000_0001_0000_0001)
    },
    extended("extended L2: unallocated cluster with allocation bits") { img in
        try img.set64(try img.l2Entry(2, entrySize: 16) + 8, 0xFFFF_FFFF_0000_0001)
    },
    extended("extended L2: compressed cluster with a bitmap") { img in
        try img.set64(try img.l2Entry(16, entrySize: 16) + 8, 1)
    },
    extended("extended L2: zero cluster with an unaligned offset", dataIntact: true) { img in
        try img.set64(try img.l2Entry(2, entrySize: 16), 0x7_0200)
    },

    // MARK: Snapshot table
    withSnapshot("snapshot L1 table not aligned", dataIntact: true) { img in
        try img.set64(try img.snapshotTable, try img.u64(try img.snapshotTable) + 0x200)
    },
    withSnapshot("snapshot L1 table too large", dataIntact: true, ownRepair: ["all": 2]) { img in
        try img.set32(try img.snapshotTable + 8, 0x100_0000)
    },
    withSnapshot("snapshot extra data too large", dataIntact: true) { img in
        try img.set32(try img.snapshotTable + 36, 2000)
    },
    withSnapshot("snapshot table shorter than nb_snapshots", dataIntact: true) { img in
        try img.set32(60, 2)
    },
    withSnapshot("snapshot table past the end of the file", dataIntact: true) { img in
        try img.set64(64, 0x1000_0000)
    },
    withSnapshot("more than 65536 snapshots", dataIntact: true) { img in
        try img.set32(60, 70_000)
    },
    CheckCase(name: "snapshot in an image with a data file", build: { b, img in
        try await CkBase.dataFile(b)
        let cs = try img.clusterSize
        let at = (try fileSize(img.path) + cs - 1) / cs * cs
        var entry: [UInt8] = []
        entry.append(contentsOf: [UInt8](repeating: 0, count: 12))
        entry.append(contentsOf: [0, 1, 0, 1])                              // id and name sizes
        entry.append(contentsOf: [UInt8](repeating: 0, count: 20))
        entry.append(contentsOf: [0, 0, 0, 24])                             // extra data size
        entry.append(contentsOf: [UInt8](repeating: 0, count: 24))
        entry.append(contentsOf: Array("1x".utf8))
        try patch(img.path, at: at, entry)
        try img.set32(60, 1)
        try img.set64(64, at)
    }),

    // MARK: Refcount table and blocks
    standard("refcount table entry with reserved bits", dataIntact: true, ownRepair: ["all": 0]) { img in
        try img.set64(try img.reftable, try img.u64(try img.reftable) | 1)
    },
    standard("refcount block not aligned", dataIntact: true, ownRepair: ["all": 0]) { img in
        try img.set64(try img.reftable, try img.u64(try img.reftable) + 0x200)
    },
    standard("refcount block outside the image", dataIntact: true, ownRepair: ["all": 0]) { img in
        try img.set64(try img.reftable, 0x1000_0000)
    },
    CheckCase(name: "refcount blocks do not cover the image (table entry missing)", build: { b, img in
        try await b.create("img.qcow2", size: "4M", options: "cluster_size=512")
        try await b.io("img.qcow2", ["write -P 1 0 256k"])
        try ckCopy(img.path, b.path("pristine.qcow2"))
        try img.set64(try img.reftable + 8, 0)
    }, dataIntact: true),
    standard("refcount block referenced twice", dataIntact: true) { img in
        try img.set64(try img.reftable + 8, try img.u64(try img.reftable))
    },
]

@Suite("check: corpus against qemu-img")
struct CheckCorpusTests {
    @Test("check and repair match qemu-img", arguments: checkCorpus)
    func corpusCase(_ c: CheckCase) async throws {
        try await withTempDir("check-\(c.name)") { dir in
            let b = ImageBuilder(dir: dir)
            let img = CkImage(path: b.path("img.qcow2"))
            try await c.build(b, img)

            // The check alone: same exit code, report and messages, in both output formats.
            for output in ["json", "human"] {
                let q = try await ckQemuCheck(["--output=\(output)"], "img.qcow2", cwd: dir)
                let o = try await ckOurCheck(["--output=\(output)"], "img.qcow2", cwd: dir)
                expectSane(o)
                #expect(o.status == q.status, "\(c.name) (\(output)): exit \(o.status.map(String.init) ?? "-") vs qemu-img \(q.status.map(String.init) ?? "-")\nours: \(o)\nqemu-img: \(q)")
                #expect(o.stdout == q.stdout, "\(c.name) (\(output)): report differs\nours:\n\(o.stdout)\nqemu-img:\n\(q.stdout)")
                #expect(ckNormalizedStderr(o.stderr) == ckNormalizedStderr(q.stderr),
                        "\(c.name) (\(output)): messages differ\nours:\n\(o.stderr.prefix(3000))\nqemu-img:\n\(q.stderr.prefix(3000))")
                if output == "json", q.status != 1 {
                    let oc = CkCounts(json: o.stdout), qc = CkCounts(json: q.stdout)
                    #expect(oc != nil && oc == qc, "\(c.name): counts \(oc.map(\.description) ?? "none") vs qemu-img \(qc.map(\.description) ?? "none")")
                }
            }

            for mode in ["leaks", "all"] {
                let qName = "q-\(mode).qcow2", oName = "o-\(mode).qcow2"
                try ckCopy(img.path, b.path(qName))
                try ckCopy(img.path, b.path(oName))
                let qr = try await ckQemuCheck(["-r", mode, "--output=json"], qName, cwd: dir)
                let or = try await ckOurCheck(["-r", mode, "--output=json"], oName, cwd: dir)
                expectSane(or)
                let context = "\(c.name), -r \(mode)"
                let qAfter = try await ckQemuCheck(["--output=json"], qName, cwd: dir)
                let oAfter = try await ckQemuCheck(["--output=json"], oName, cwd: dir)

                // One pass converges: our own verdict on our repaired image is qemu-img's.
                let oSelf = try await ckOurCheck(["--output=json"], oName, cwd: dir)
                #expect(oSelf.status == oAfter.status, "\(context): after our repair, we say \(oSelf) but qemu-img says \(oAfter)")

                if let expected = c.ownRepair[mode] {
                    #expect(oAfter.status == expected, "\(context): qemu-img check after our repair: \(oAfter)\nour repair: \(or)")
                } else {
                    #expect(or.status == qr.status, "\(context): exit \(or) vs qemu-img \(qr)")
                    #expect(or.stdout.replacingOccurrences(of: oName, with: qName) == qr.stdout,
                            "\(context): report differs\nours:\n\(or.stdout)\nqemu-img:\n\(qr.stdout)")
                    #expect(ckNormalizedStderr(or.stderr).replacingOccurrences(of: oName, with: qName) == ckNormalizedStderr(qr.stderr),
                            "\(context): messages differ\nours:\n\(or.stderr.prefix(3000))\nqemu-img:\n\(qr.stderr.prefix(3000))")
                    if !c.bytesDiffer.contains(mode) {
                        let diff = try fileDifference(b.path(oName), b.path(qName))
                        #expect(diff == nil, "\(context): our repaired file differs from qemu-img's: \(diff ?? "")")
                    }
                    #expect(oAfter.status == qAfter.status, "\(context): qemu-img check after our repair \(oAfter)\nafter its own: \(qAfter)")
                    if qAfter.status != 1 {
                        #expect(CkCounts(json: oAfter.stdout) == CkCounts(json: qAfter.stdout),
                                "\(context): after repair: ours \(oAfter.stdout) vs qemu-img's \(qAfter.stdout)")
                    }
                }

                // Guest data: what qemu-img's repair leaves, and what the image held before
                // the corruption where the corruption did not touch guest data.
                if qAfter.status == 0 && oAfter.status == 0 {
                    let cmp = try await run("qemu-img", ["compare", "-q", qName, oName], cwd: dir, timeout: 120)
                    #expect(cmp.status == 0, "\(context): guest data differs from qemu-img's repair: \(cmp)")
                }
                if mode == "all" && c.dataIntact && or.status != 1 {
                    let cmp = try await run("qemu-img", ["compare", "-q", "pristine.qcow2", oName], cwd: dir, timeout: 120)
                    #expect(cmp.status == 0, "\(context): guest data changed by the repair: \(cmp)")
                }
            }
        }
    }
}
