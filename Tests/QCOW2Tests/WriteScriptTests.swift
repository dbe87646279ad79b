import Foundation
import Testing

/// How an image for the same-script test is made.
struct WScriptConfig: Sendable, CustomTestStringConvertible {
    enum Backing: Sendable { case none, qcow2Pattern, rawShorter }
    var name: String
    var options: String?
    var clusterSize = 65536
    var backing: Backing = .none
    /// An external data file: A uses `a.data`; B is a copy of both files, pointed at `b.data`
    /// with `qemu-img amend`. (qemu 7.2 resolves relative data-file names against the cwd,
    /// so everything runs in the image directory.) QEMU cannot compress into such images.
    var dataFile = false
    var testDescription: String { name }

    var imageA: String { "a.qcow2" }
    var imageB: String { "b.qcow2" }

    var size: Int { max(4 << 20, 32 * max(clusterSize, 16384)) }

    static let all: [WScriptConfig] = [
        .init(name: "default", options: nil),
        .init(name: "extended_l2=on", options: "extended_l2=on"),
        .init(name: "extended_l2=on cluster_size=16k, qcow2 backing", options: "extended_l2=on,cluster_size=16k",
              clusterSize: 16384, backing: .qcow2Pattern),
        .init(name: "compat=0.10", options: "compat=0.10"),
        .init(name: "compat=0.10, qcow2 backing", options: "compat=0.10", backing: .qcow2Pattern),
        .init(name: "cluster_size=512", options: "cluster_size=512", clusterSize: 512),
        .init(name: "cluster_size=2M", options: "cluster_size=2M", clusterSize: 2 << 20),
        .init(name: "refcount_bits=1", options: "refcount_bits=1"),
        .init(name: "refcount_bits=64 cluster_size=4k", options: "refcount_bits=64,cluster_size=4k", clusterSize: 4096),
        .init(name: "compression_type=zstd", options: "compression_type=zstd"),
        .init(name: "lazy_refcounts=on", options: "lazy_refcounts=on"),
        .init(name: "qcow2 backing with a pattern", options: nil, backing: .qcow2Pattern),
        .init(name: "raw backing shorter than the overlay", options: nil, backing: .rawShorter),
        .init(name: "raw backing shorter, cluster_size=512", options: "cluster_size=512", clusterSize: 512, backing: .rawShorter),
        .init(name: "data_file", options: "data_file=a.data", dataFile: true),
        .init(name: "data_file, extended_l2=on", options: "data_file=a.data,extended_l2=on", dataFile: true),
    ]

    /// The command script, in two parts run by two processes (the image is reopened between them).
    /// Regions start at multiples of `u` (at least 16 KiB) so that the fixed-length unaligned
    /// writes never spill into a region another command expects to be unallocated.
    func script() -> [[String]] {
        let c = clusterSize, u = max(clusterSize, 16384), s = size, h = size / 2
        let first = [
            "write -P 0x11 0 \(3 * c)",                  // aligned, several clusters
            "write -P 0x22 1000 3000",                    // unaligned, inside (or across small) clusters
            "write -P 0x33 \(u + 100) \(c + 5000)",       // unaligned, crossing cluster boundaries
            "write -z \(c) \(c)",                         // zero a whole allocated cluster
            "write -z \(u + 512) 1024",                   // partial zero over data
            "write -z -u 0 \(c)",                         // zero with unmap over an allocated cluster
            "write -z -u \(8 * u) \(2 * c)",              // zero with unmap over unallocated clusters
            "write -z \(20 * u) \(c)",                    // zero without unmap over unallocated
            "discard \(2 * c) \(c)",                      // whole-cluster discard
            "discard \(u + c + 512) 512",                 // sub-cluster discard (ignored by QEMU)
            "write -P 0x12 \(5 * u) \(3 * c)",
            "discard \(5 * u + c / 2) \(2 * c)",          // partial head and tail, one whole cluster inside
            "write -c -P 0x66 \(10 * u) \(2 * c)",        // compressed, into unallocated clusters
            "flush",
        ]
        let second = [
            "write -P 0x77 \(10 * u + 100) 200",          // partial overwrite of a compressed cluster
            "write -P 0x44 \(s - 4096) 4096",             // end of the disk
            "write -P 0x55 \(h) \(c)",
            "write -z \(h + c / 4) \(max(512, c / 2))",
            "discard \(h + c) 512",
            "write -P 0x88 \(12 * u) 100",
            "discard \(12 * u) \(c)",                     // discard a freshly written cluster
            "write -z \(14 * u + 100) \(3 * c)",          // unaligned zero write across clusters
            "write -P 0x99 \(16 * u) \(c / 2)",
            "write -z -u \(16 * u) \(max(512, c / 4))",
            "write -P 0xaa \(h - 700) 1400",              // across the end of the short raw backing file
            "write -c -P 0x5a \(22 * u) \(c)",            // compressed, then discarded
            "discard \(22 * u) \(c)",
            "write -P 0x3c \(24 * u + 512) \(c)",         // COW from the backing file on both sides
            "flush",
            "write -P 0x3d \(26 * u) 512",
        ]
        if dataFile { return [first, second].map { $0.filter { !$0.hasPrefix("write -c") } } }
        return [first, second]
    }

    /// Makes image A (and its backing or data file) in `dir` with qemu-img, and B as a copy.
    func makeImages(_ b: ImageBuilder) async throws {
        if dataFile {
            try await b.create("a.qcow2", size: String(size), options: options)
            try wCopy(b.path("a.qcow2"), b.path("b.qcow2"))
            try wCopy(b.path("a.data"), b.path("b.data"))
            try await b.img(["amend", "-f", "qcow2", "-o", "data_file=b.data", "b.qcow2"])
            return
        }
        try await makeImage(b)
        try wCopy(b.path("a.qcow2"), b.path("b.qcow2"))
    }

    /// Makes `a.qcow2` (and its backing file) in `dir` with qemu-img.
    func makeImage(_ b: ImageBuilder) async throws {
        switch backing {
        case .none:
            try await b.create("a.qcow2", size: String(size), options: options)
        case .qcow2Pattern:
            try await b.create("base.qcow2", size: String(size), options: options)
            let c = clusterSize
            try await b.io("base.qcow2", [
                "write -P 0xb1 0 \(size / 2)",
                "write -P 0xb2 \(size / 2 + c / 2) \(size / 4)",
                "write -z \(4 * c) \(2 * c)",
            ])
            try await b.create("a.qcow2", size: String(size), options: options, backing: "base.qcow2")
        case .rawShorter:
            // Not a sector multiple, and each 4 KiB block a different byte.
            let n = size / 2 - 1000
            try b.write("base.raw", Data((0..<n).map { UInt8(0xc0 + ($0 >> 12) % 16) }))
            try await b.create("a.qcow2", size: String(size), options: options, backing: "base.raw", backingFormat: "raw")
        }
    }
}

@Suite("Write: the same qemu-io script gives the same image as qemu-io")
struct WriteScriptTests {
    @Test("qcow2 io script == qemu-io script", arguments: WScriptConfig.all)
    func sameScript(_ cfg: WScriptConfig) async throws {
        try await withTempDir("script-" + cfg.name) { dir in
            let b = ImageBuilder(dir: dir)
            try await cfg.makeImages(b)
            let (a, bImage) = (cfg.imageA, cfg.imageB)

            for part in cfg.script() {
                let q = try await wQemuIO(a, part, cwd: dir)
                try #require(wIOClean(q), "qemu-io must accept the script: \(q)")
                let o = try await wOurIO(bImage, part, cwd: dir)
                expectSane(o)
                #expect(wIOClean(o), "qcow2 io failed on a script qemu-io accepts: \(o)")
            }

            try await wExpectIdentical(a, bImage, cwd: dir, context: cfg.name)
            try await wExpectCleanCheck(bImage, cwd: dir, context: cfg.name)

            // Reads of qemu's result, checked on our image by qemu-io and by our reader.
            let expected = try await wQemuRawBytes(a, scratch: dir + "/a.raw", cwd: dir)
            let checks = wReadChecks(for: expected, limit: 150)
            let qr = try await wQemuIO(bImage, checks, readOnly: true, cwd: dir)
            #expect(wIOClean(qr), "qemu-io read -P checks on our image: \(qr)")
            let or = try await wOurIO(bImage, checks, readOnly: true, cwd: dir)
            expectSane(or)
            #expect(wIOClean(or), "qcow2 io read -P checks on our image: \(or)")

            try await wExpectSameMap(a, bImage, cwd: dir, context: cfg.name)

            // Same header state after close (dirty bit, corrupt bit, …).
            // (The data file names differ by construction.)
            func info(_ image: String) async throws -> [String: Any] {
                var i = try #require(try parseJSON(try await qemuImg(["info", "--output=json", image], cwd: dir), "info") as? [String: Any])
                if var fs = i["format-specific"] as? [String: Any], var data = fs["data"] as? [String: Any] {
                    data["data-file"] = nil
                    fs["data"] = data
                    i["format-specific"] = fs
                }
                return i
            }
            let ia = try await info(a), ib = try await info(bImage)
            for key in ["dirty-flag", "format-specific", "virtual-size", "cluster-size", "backing-filename"] {
                #expect(canonicalJSON(ia[key] ?? "absent") == canonicalJSON(ib[key] ?? "absent"),
                        "info \(key): qemu-io's \(canonicalJSON(ia[key] ?? "absent")) vs ours \(canonicalJSON(ib[key] ?? "absent"))")
            }
        }
    }

    /// Commands qemu-io accepts or refuses: `qcow2 io` must give the same exit code and leave
    /// the image with the same content.
    @Test("qcow2 io accepts and refuses what qemu-io does", arguments: [
        "write -c 0 64k",            // compressed over an allocated cluster
        "write -c 100 64k",          // unaligned compressed write
        "write -c 128k 1000",        // partial compressed cluster
        "write -c 960k 64k",         // compressed, last cluster
        "write 1M 1",                // past the end
        "write 1048000 1000",        // across the end
        "read 1048000 1000",
        "discard 1048000 1000",
        "write -z 1048000 1000",
        "write -u 0 4k",             // -u without -z
        "write -z -c 128k 64k",
        "write -P 0x100 0 1",        // not a byte
        "write -P 256 0 1",
        "write -P 1 -1 1",           // negative offset
        "write 0 0",
        "read -P 1 0 0",
        "read -P 0x9 0 64k",         // matches
        "read -P 0x8 0 64k",         // pattern mismatch
        "frobnicate",
    ])
    func commandParity(_ command: String) async throws {
        try await withTempDir("parity") { dir in
            let b = ImageBuilder(dir: dir)
            try await b.create("a.qcow2", size: "1M")
            try wCopy(b.path("a.qcow2"), b.path("b.qcow2"))
            let q = try await wQemuIO("a.qcow2", ["write -P 9 0 64k", command], cwd: dir)
            try #require(!q.crashed && !q.timedOut, "qemu-io: \(q)")
            let o = try await wOurIO("b.qcow2", ["write -P 9 0 64k", command], cwd: dir)
            expectSane(o)
            #expect(o.status == q.status, "exit code for `\(command)`: ours \(o)\nqemu-io: \(q)")
            try await wExpectIdentical("a.qcow2", "b.qcow2", cwd: dir, context: "after `\(command)`")
            try await wExpectCleanCheck("b.qcow2", cwd: dir, context: "after `\(command)`")
        }
    }
}
