import Foundation
import Testing

/// An image QEMU creates and writes first, which we then modify.
struct WInteropConfig: Sendable, CustomTestStringConvertible {
    var name: String
    var options: String?
    var clusterSize = 65536
    var v3 = true
    var withBacking = false
    var seed: UInt64
    var testDescription: String { name }

    var size: Int { max(4 << 20, 64 * clusterSize) }

    static let all: [WInteropConfig] = [
        .init(name: "default", options: nil, seed: 101),
        .init(name: "extended_l2=on", options: "extended_l2=on", seed: 102),
        .init(name: "extended_l2=on cluster_size=32k, qcow2 backing", options: "extended_l2=on,cluster_size=32k",
              clusterSize: 32768, withBacking: true, seed: 103),
        .init(name: "compat=0.10", options: "compat=0.10", v3: false, seed: 104),
        .init(name: "cluster_size=512", options: "cluster_size=512", clusterSize: 512, seed: 105),
        .init(name: "compression_type=zstd", options: "compression_type=zstd", seed: 106),
        .init(name: "lazy_refcounts=on", options: "lazy_refcounts=on", seed: 107),
        .init(name: "refcount_bits=2", options: "refcount_bits=2", seed: 108),
        .init(name: "qcow2 backing", options: nil, withBacking: true, seed: 109),
    ]

    /// What qemu-io writes first: data, compressed clusters, zero clusters, discards,
    /// partial (sub-cluster) writes.
    var qemuOps: [WOp] {
        let c = clusterSize
        return [
            .write(offset: 0, length: 4 * c, pattern: 0x11),
            .compressed(offset: 8 * c, length: 2 * c, pattern: 0x12),
            .zero(offset: 4 * c, length: c, unmap: false),
            .write(offset: 12 * c + 300, length: 2 * c, pattern: 0x13),
            .zero(offset: 0, length: c, unmap: true),
            .write(offset: 16 * c + 1000, length: 3000, pattern: 0x14),
            .write(offset: 20 * c, length: 6 * c, pattern: 0x15),
            .discard(offset: 22 * c, length: c),
            .write(offset: size - c, length: c, pattern: 0x16),
        ]
    }

    /// What we write on top: into compressed clusters, zero clusters, discarded clusters,
    /// partially written clusters; zero writes and discards of QEMU's clusters.
    var ourOps: [WOp] {
        let c = clusterSize
        return [
            .write(offset: 8 * c + 100, length: 300, pattern: 0x21),    // inside a compressed cluster
            .zero(offset: 9 * c, length: c, unmap: true),               // unmap the other compressed cluster
            .write(offset: 4 * c + 50, length: 100, pattern: 0x22),     // inside a zero cluster
            .discard(offset: c, length: c),                             // QEMU's data cluster
            .zero(offset: 2 * c + 100, length: 1000, unmap: false),
            .write(offset: 16 * c + 5000 % c, length: 100, pattern: 0x23),
            .write(offset: 22 * c - 10, length: c + 20, pattern: 0x24),   // across the discarded cluster
            .discard(offset: 24 * c, length: 3 * c),
            .write(offset: 30 * c, length: 5 * c + 7, pattern: 0x25),   // fresh allocations
            .flush,
            .write(offset: size - 100, length: 100, pattern: 0x26),
            .zero(offset: 12 * c, length: 2 * c, unmap: true),
        ]
    }

    /// What qemu-io writes on top of our changes (allocations after ours, reuse of freed clusters).
    var qemuAgainOps: [WOp] {
        let c = clusterSize
        return [
            .write(offset: 40 * c, length: 3 * c, pattern: 0x31),
            .write(offset: c + 10, length: 20, pattern: 0x32),
            .compressed(offset: 44 * c, length: c, pattern: 0x33),
            .write(offset: 24 * c, length: 2 * c, pattern: 0x34),
            .zero(offset: 30 * c, length: c, unmap: true),
        ]
    }
}

@Suite("Write: images QEMU wrote, modified by us (and again by QEMU)")
struct WriteInteropTests {
    @Test("qemu-io writes, then qcow2 io, then qemu-io reads and writes", arguments: WInteropConfig.all)
    func qemuThenUs(_ cfg: WInteropConfig) async throws {
        try await withTempDir("interop-" + cfg.name) { dir in
            let b = ImageBuilder(dir: dir)
            var backing: [UInt8]?
            if cfg.withBacking {
                try await b.create("base.qcow2", size: String(cfg.size), options: cfg.options)
                try await b.io("base.qcow2", ["write -P 0xb0 0 \(cfg.size * 3 / 4)", "write -z \(3 * cfg.clusterSize) \(cfg.clusterSize)"])
                try await b.create("img.qcow2", size: String(cfg.size), options: cfg.options, backing: "base.qcow2")
                backing = try await wQemuRawBytes("base.qcow2", scratch: dir + "/base.raw", cwd: dir)
            } else {
                try await b.create("img.qcow2", size: String(cfg.size), options: cfg.options)
            }
            var model = WModel(size: cfg.size, clusterSize: cfg.clusterSize, v3: cfg.v3, backing: backing)

            // 1. QEMU writes.
            let q1 = try await wQemuIO("img.qcow2", cfg.qemuOps.map(\.command), cwd: dir)
            try #require(wIOClean(q1), "qemu-io: \(q1)")
            cfg.qemuOps.forEach { model.apply($0) }

            // 2. We write on top (two processes).
            let ours = cfg.ourOps.map(\.command)
            for part in [Array(ours.prefix(6)), Array(ours.dropFirst(6))] {
                let r = try await wOurIO("img.qcow2", part, cwd: dir)
                expectSane(r)
                #expect(wIOClean(r), "qcow2 io on qemu's image: \(r)")
            }
            cfg.ourOps.forEach { model.apply($0) }
            try await verify("after our writes", model: model, dir: dir, context: cfg.name)

            // 3. QEMU writes again, on top of our metadata.
            let q2 = try await wQemuIO("img.qcow2", cfg.qemuAgainOps.map(\.command), cwd: dir)
            #expect(wIOClean(q2), "qemu-io could not write to the image after our changes: \(q2)")
            cfg.qemuAgainOps.forEach { model.apply($0) }
            try await verify("after qemu-io wrote again", model: model, dir: dir, context: cfg.name)

            // 4. Alternating random rounds: qemu-io, us, qemu-io, us.
            let gen = WPropertyVariant(name: cfg.name, options: cfg.options, clusterSize: cfg.clusterSize, v3: cfg.v3,
                                       size: cfg.size, seed: cfg.seed)
            var rng = WSplitMix64(seed: cfg.seed)
            for round in 0..<4 {
                let ops = gen.randomOps(12, rng: &rng)
                let commands = ops.map(\.command)
                let r = round % 2 == 0
                    ? try await wQemuIO("img.qcow2", commands, cwd: dir)
                    : try await wOurIO("img.qcow2", commands, cwd: dir)
                expectSane(r)
                #expect(wIOClean(r), "round \(round) (\(round % 2 == 0 ? "qemu-io" : "qcow2 io")): \(r)")
                ops.forEach { model.apply($0) }
                try await verify("random round \(round), commands:\n\(commands.joined(separator: "\n"))", model: model, dir: dir, context: cfg.name)
            }
        }
    }

    /// Content equals the model (qemu-img compare, qemu-io read -P, our read -P); check clean.
    func verify(_ stage: String, model: WModel, dir: String, context: String,
                sourceLocation: SourceLocation = #_sourceLocation) async throws {
        try model.write(to: dir + "/model.raw")
        let what = "\(context), \(stage)"
        try await wExpectIdentical("img.qcow2", "model.raw", formatB: "raw", cwd: dir, context: what, sourceLocation: sourceLocation)
        try await wExpectCleanCheck("img.qcow2", cwd: dir, context: what, sourceLocation: sourceLocation)
        let checks = wReadChecks(for: model.bytes, limit: 120)
        let q = try await wQemuIO("img.qcow2", checks, readOnly: true, cwd: dir)
        #expect(wIOClean(q), "\(what): qemu-io read -P checks: \(q)", sourceLocation: sourceLocation)
        let o = try await wOurIO("img.qcow2", checks, readOnly: true, cwd: dir)
        expectSane(o, sourceLocation: sourceLocation)
        #expect(wIOClean(o), "\(what): qcow2 io read -P checks: \(o)", sourceLocation: sourceLocation)
    }
}

@Suite("Write: image locking against QEMU")
struct WriteLockTests {
    /// The lock holder is `qemu-nbd --fork --persistent` (it returns once the image is open and locked,
    /// so there is no start-up race), written to through its socket.
    @Test("qcow2 io cannot write while qemu-nbd holds the image open for writing")
    func lockedByQemu() async throws {
        try await withTempDir("lock") { dir in
            let b = ImageBuilder(dir: dir)
            try await b.create("img.qcow2", size: "4M")
            let started = try await run("qemu-nbd", ["--fork", "--persistent", "--pid-file=" + dir + "/nbd.pid", "-k", dir + "/nbd.sock",
                                                     "-f", "qcow2", "img.qcow2"], cwd: dir)
            try #require(started.succeeded, "qemu-nbd: \(started)")
            let pid = try String(contentsOfFile: dir + "/nbd.pid", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            var stopped = false
            defer { if !stopped { _ = kill(pid_t(pid) ?? 0, SIGKILL) } }
            let uri = "nbd+unix:///?socket=" + dir + "/nbd.sock"
            let holderWrite = try await run("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 64k", uri], cwd: dir)
            #expect(wIOClean(holderWrite), "write through qemu-nbd: \(holderWrite)")

            let w = try await wOurIO("img.qcow2", ["write 0 4k"], cwd: dir)
            expectSane(w)
            #expect(w.status == 1, "a write open must fail while qemu-nbd holds the image: \(w)")
            #expect((w.stdout + w.stderr).lowercased().contains("lock"), "the error should mention the lock: \(w)")

            // A read-only open: do what qemu-io -r does in the same situation.
            let qr = try await wQemuIO("img.qcow2", ["read 0 4k"], readOnly: true, cwd: dir)
            let or = try await wOurIO("img.qcow2", ["read 0 4k"], readOnly: true, cwd: dir)
            expectSane(or)
            #expect(or.succeeded == qr.succeeded,
                    "read-only open while qemu-nbd writes: ours \(or.succeeded ? "succeeds" : "fails") like qemu-io -r? qemu-io -r: \(qr)\nours: \(or)")

            // Stop the holder and wait until it is gone (its lock goes with it).
            _ = kill(pid_t(pid) ?? 0, SIGTERM)
            stopped = true
            for _ in 0..<200 where kill(pid_t(pid) ?? 0, 0) == 0 { try await Task.sleep(for: .milliseconds(50)) }

            // Released: now our write goes through, and the holder's data was left alone.
            let q = try await wQemuIO("img.qcow2", ["read -P 0x77 0 64k"], readOnly: true, cwd: dir)
            #expect(wIOClean(q), "the holder's write is intact after our refused open: \(q)")
            let w2 = try await wOurIO("img.qcow2", ["write -P 0x78 0 4k"], cwd: dir)
            expectSuccess(w2)
            let q2 = try await wQemuIO("img.qcow2", ["read -P 0x78 0 4k", "read -P 0x77 4k 60k"], readOnly: true, cwd: dir)
            #expect(wIOClean(q2), "after the lock is released: \(q2)")
            try await wExpectCleanCheck("img.qcow2", cwd: dir, context: "lock")
        }
    }
}

@Suite("Write: raw images")
struct RawWriteTests {
    /// A zero write of GiBs to a raw image zeroes exactly the range (fallocate, or bounded
    /// chunks of zeros), never allocating memory in proportion to the request, and leaves
    /// the same bytes as qemu-io's `write -z` on a copy.
    @Test("raw write -z over 3 GiB: same bytes as qemu-io, bounded memory")
    func rawZeroes() async throws {
        try await withTempDir("raw-zero") { dir in
            _ = try await qemuImg(["create", "-q", "-f", "raw", "big.raw", "4G"], cwd: dir)
            try await qemuIO(dir + "/big.raw", ["write -P 0x55 511M 2M", "write -P 0x66 3583M 2M"], format: "raw", cwd: dir)
            _ = try await run("cp", ["--sparse=always", "big.raw", "expected.raw"], cwd: dir)
            // qemu-io takes at most 2 GiB per request.
            try await qemuIO(dir + "/expected.raw", ["write -z 512M 1536M", "write -z 2G 1536M"], format: "raw", cwd: dir)
            let r = try await run("/usr/bin/time", ["-f", "maxrss=%M", QCOW2Binary.path, "io", "-f", "raw", "-c", "write -z 512M 3G", "big.raw"],
                                  cwd: dir, timeout: 120)
            #expect(r.succeeded, "\(r)")
            if let line = r.stderr.split(separator: "\n").last(where: { $0.hasPrefix("maxrss=") }), let kb = Int(line.dropFirst(7)) {
                #expect(kb < 64 * 1024, "peak RSS \(kb) KiB for a 3 GiB zero write")
            }
            let cmp = try await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", "big.raw", "expected.raw"], cwd: dir, timeout: 120)
            #expect(cmp.status == 0, "\(cmp)")
        }
    }
}
