import Foundation
import Testing

/// A kind of image for the random-sequence property test.
struct WPropertyVariant: Sendable, CustomTestStringConvertible {
    enum Backing: Sendable { case none, chain, rawShorter }
    var name: String
    var options: String?
    var clusterSize = 65536
    var v3 = true
    var backing: Backing = .none
    var size = 8 << 20
    /// Commands per round (one `qcow2 io` process per batch) and rounds per sequence.
    var opsPerRound = 30
    var batch = 10
    var rounds = 3
    /// Upper bound of the "large" write lengths.
    var largeLength = 1 << 20
    /// Percent weights of write / zero / discard (the rest are flushes).
    var weights = (write: 50, zero: 20, discard: 22)
    /// The variant must make the refcount table grow (checked at the end): a write of this
    /// many bytes at a random offset opens the second round, in the middle of the history.
    var growthWrite: Int?
    var seed: UInt64

    var testDescription: String { name }

    static let all: [WPropertyVariant] = [
        .init(name: "plain", options: nil, seed: 0x5EED_0001),
        .init(name: "extended_l2=on", options: "extended_l2=on", seed: 0x5EED_0002),
        .init(name: "backing chain", options: nil, backing: .chain, seed: 0x5EED_0003),
        .init(name: "backing chain, extended_l2=on cluster_size=16k", options: "extended_l2=on,cluster_size=16k",
              clusterSize: 16384, backing: .chain, seed: 0x5EED_0004),
        .init(name: "raw backing shorter than the overlay", options: nil, backing: .rawShorter, seed: 0x5EED_0005),
        .init(name: "refcount_bits=1", options: "refcount_bits=1", seed: 0x5EED_0006),
        .init(name: "compat=0.10", options: "compat=0.10", v3: false, seed: 0x5EED_0007),
        .init(name: "compat=0.10, backing chain", options: "compat=0.10", v3: false, backing: .chain, seed: 0x5EED_0008),
        // 512-byte clusters with 16-bit refcounts: one refcount-table cluster covers 8 MiB of
        // file, so writing more than that forces the table to grow (and move).
        .init(name: "cluster_size=512 (refcount table growth)", options: "cluster_size=512", clusterSize: 512,
              size: 32 << 20, opsPerRound: 24, batch: 12, rounds: 3, largeLength: 4 << 20,
              weights: (write: 75, zero: 10, discard: 10), growthWrite: 12 << 20, seed: 0x5EED_0009),
        // 64-bit refcounts: the table outgrows one cluster after 2 MiB of file.
        .init(name: "cluster_size=512 refcount_bits=64, backing chain", options: "cluster_size=512,refcount_bits=64",
              clusterSize: 512, backing: .chain, size: 6 << 20, largeLength: 256 << 10,
              weights: (write: 65, zero: 15, discard: 15), growthWrite: 3 << 20, seed: 0x5EED_000A),
    ]

    /// Random commands over the whole disk: aligned and unaligned offsets, lengths from one
    /// byte to `largeLength`, zero writes with and without unmap, discards, flushes.
    func randomOps(_ count: Int, rng: inout WSplitMix64) -> [WOp] {
        let c = clusterSize
        return (0..<count).map { _ in
            let kind = rng.below(100)
            if kind >= weights.write + weights.zero + weights.discard { return .flush }
            var offset = rng.chance(40) ? rng.below(size / c) * c : rng.below(size)
            var length: Int
            switch rng.below(100) {
            case ..<25: length = 1 + rng.below(1024)
            case ..<60: length = 1 + rng.below(2 * c)
            case ..<85: length = (1 + rng.below(4)) * c
            default: length = 1 + rng.below(largeLength)
            }
            if rng.chance(20) { offset = offset / 512 * 512; length = max(512, length / 512 * 512) }
            if offset >= size { offset = size - 1 }
            length = max(1, min(length, size - offset))
            if kind < weights.write {
                return .write(offset: offset, length: length, pattern: UInt8(1 + rng.below(255)))
            } else if kind < weights.write + weights.zero {
                return .zero(offset: offset, length: length, unmap: rng.chance(50))
            } else {
                return .discard(offset: offset, length: length)
            }
        }
    }

    /// Makes `img.qcow2` (and its backing files) with the qemu tools; returns the content of
    /// the backing chain (nil without one), as qemu-img reads it.
    func makeImage(_ b: ImageBuilder) async throws -> [UInt8]? {
        let c = clusterSize
        switch backing {
        case .none:
            try await b.create("img.qcow2", size: String(size), options: options)
            return nil
        case .chain:
            try await b.create("base.qcow2", size: String(size), options: options)
            try await b.io("base.qcow2", [
                "write -P 0xb1 0 \(size / 2)",
                "write -P 0xb2 \(size / 2 + c + 100) \(size / 4)",
                "write -z \(2 * c) \(c)",
            ])
            try await b.create("mid.qcow2", size: String(size), options: options, backing: "base.qcow2")
            try await b.io("mid.qcow2", [
                "write -P 0xc1 \(size / 8 + 300) \(size / 8)",
                "write -z \(size / 4 + 7 * c) \(5 * c)",
                "write -P 0xc2 \(size - size / 16) \(size / 16)",
            ])
            try await b.create("img.qcow2", size: String(size), options: options, backing: "mid.qcow2")
            return try await wQemuRawBytes("mid.qcow2", scratch: b.path("mid.raw"), cwd: b.dir)
        case .rawShorter:
            let n = size * 3 / 8 + 777
            try b.write("base.raw", Data((0..<n).map { UInt8(0x80 + ($0 / 3000) % 64) }))
            try await b.create("img.qcow2", size: String(size), options: options, backing: "base.raw", backingFormat: "raw")
            return [UInt8](try readFile(b.path("base.raw")))
        }
    }
}

@Suite("Write: random sequences match a byte model")
struct WritePropertyTests {
    @Test("random write/zero/discard/flush sequences", arguments: WPropertyVariant.all)
    func randomSequences(_ v: WPropertyVariant) async throws {
        let iterations = wPropertyIterations(default: 2)
        for iteration in 0..<iterations {
            let seed = v.seed &+ UInt64(iteration) &* 0x1_0000_0001
            let ok = try await runSequence(v, seed: seed)
            if !ok { break }
        }
    }

    /// One random sequence on a fresh image. Returns false after the first failing round.
    func runSequence(_ v: WPropertyVariant, seed: UInt64) async throws -> Bool {
        try await withTempDir("prop-" + v.name) { dir in
            let b = ImageBuilder(dir: dir)
            var rng = WSplitMix64(seed: seed)
            let backing = try await v.makeImage(b)
            // qemu-io runs the same commands on a copy: it checks the model itself, so that a
            // model mistake is reported as such and not blamed on the engine.
            try wCopy(b.path("img.qcow2"), b.path("qemu.qcow2"))
            var model = WModel(size: v.size, clusterSize: v.clusterSize, v3: v.v3, backing: backing)
            let context = "variant \(v.name), seed 0x\(String(seed, radix: 16))"
            var history: [String] = []

            for round in 0..<v.rounds {
                var ops = v.randomOps(v.opsPerRound, rng: &rng)
                if round == 1, let n = v.growthWrite {
                    let offset = rng.below(v.size - n)
                    ops.insert(.write(offset: offset, length: n, pattern: UInt8(1 + rng.below(255))), at: rng.below(v.batch))
                }
                let commands = ops.map(\.command)
                history += commands
                let where_ = "\(context), round \(round)"
                let replay = "commands so far (qemu-io -c syntax, one process per \(v.batch)):\n" + history.joined(separator: "\n")

                guard try await wOurIOBatched("img.qcow2", commands, batch: v.batch, cwd: dir, context: where_) else {
                    Issue.record("\(where_): \(replay)")
                    return false
                }
                for op in ops { model.apply(op) }
                try model.write(to: b.path("model.raw"))

                let q = try await wQemuIO("qemu.qcow2", commands, cwd: dir)
                try #require(wIOClean(q), "\(where_): qemu-io refused the commands: \(q)")
                let qm = try await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", "qemu.qcow2", "model.raw"], cwd: dir)
                try #require(qm.status == 0, "\(where_): TEST MODEL disagrees with qemu-io (not an engine bug): \(qm)\n\(replay)")

                let cmp = try await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", "img.qcow2", "model.raw"], cwd: dir)
                #expect(cmp.status == 0, "\(where_): image content differs from the model (and from qemu-io's image): \(cmp)\n\(replay)")
                let report = try await wExpectCleanCheck("img.qcow2", cwd: dir, context: where_)

                // Spot checks with our own reader, and one deliberately wrong pattern.
                let checks = model.readChecks(count: 24, rng: &rng)
                let r = try await wOurIO("img.qcow2", checks, readOnly: true, cwd: dir)
                expectSane(r)
                #expect(wIOClean(r), "\(where_): `qcow2 io -r` read -P spot checks failed: \(r)")
                let (o, l, byte) = model.uniformRun(at: rng.below(v.size), maxLength: 4096)
                let wrong = try await wOurIO("img.qcow2", ["read -P 0x\(String(byte ^ 0x5a, radix: 16)) \(o) \(l)"],
                                             readOnly: true, cwd: dir)
                #expect(wrong.status == 1 && wrong.stdout.contains("Pattern verification failed"),
                        "\(where_): a wrong pattern must fail the read: \(wrong)")

                if cmp.status != 0 || report == nil || !wIOClean(r) {
                    Issue.record("\(where_): \(replay)")
                    return false
                }
            }
            if v.growthWrite != nil {
                let clusters = try readBE32(b.path("img.qcow2"), at: 56)
                #expect(clusters > 1, "\(context): the refcount table never grew (\(clusters) cluster); the variant writes too little")
            }
            return true
        }
    }
}
