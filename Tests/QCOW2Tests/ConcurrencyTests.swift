import Dispatch
import Foundation
import QCOW2
import Testing

/// Several threads reading and writing different ranges of one open image at once.
@Suite("Concurrent reads and writes through the library")
struct ConcurrencyTests {
    @Test("threads writing disjoint ranges, and reading, leave exactly the written data", arguments: ["", "cluster_size=4k", "extended_l2=on"])
    func disjointWriters(_ options: String) async throws {
        try await withTempDir("concurrency") { dir in
            var args = ["create", "-q", "-f", "qcow2"]
            if !options.isEmpty { args += ["-o", options] }
            _ = try await qemuImg(args + ["base.qcow2", "32M"], cwd: dir)
            try await qemuIO(dir + "/base.qcow2", ["write -P 0x77 0 32M"], cwd: dir)
            _ = try await qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2"] + (options.isEmpty ? [] : ["-o", options]) + ["top.qcow2"], cwd: dir)
            let disk = try DiskImage.open(path: dir + "/top.qcow2", options: OpenOptions(writable: true))
            let threads = Int(ProcessInfo.processInfo.environment["QCOW2_TEST_THREADS"] ?? "8") ?? 8
            let slice: UInt64 = 4 << 20  // each thread owns 4 MiB
            let failures = FailureBox()
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                var rng = WSplitMix64(seed: UInt64(t) + 1)
                let base = UInt64(t) * slice
                let pattern = UInt8(t + 1)
                var buffer = [UInt8](repeating: pattern, count: 70_000)
                var readBack = [UInt8](repeating: 0, count: 70_000)
                for _ in 0..<60 {
                    let length = Int(rng.next() % 69_000) + 1
                    let offset = base + rng.next() % (slice - UInt64(length))
                    do {
                        try buffer.withUnsafeBytes { try disk.write(at: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
                        try readBack.withUnsafeMutableBytes { try disk.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<length])) }
                        if readBack[0..<length].contains(where: { $0 != pattern }) { failures.add("thread \(t): read-back mismatch at \(offset)") }
                        if rng.next() % 10 == 0 { try disk.flush() }
                    } catch {
                        failures.add("thread \(t): \(error)")
                    }
                }
                buffer[0] = pattern
            }
            try disk.close()
            #expect(failures.messages.isEmpty, "\(failures.messages.prefix(5))")
            let check = try await run("qemu-img", ["check", "top.qcow2"], cwd: dir, timeout: 60)
            #expect(check.status == 0, "qemu-img check after concurrent writes: \(check.stdout)\(check.stderr)")
            // Every byte is either the backing pattern or its owner thread's pattern.
            let raw = dir + "/top.raw"
            _ = try await qemuImg(["convert", "-O", "raw", "top.qcow2", raw], cwd: dir)
            let data = try Data(contentsOf: URL(fileURLWithPath: raw))
            for t in 0..<threads {
                let range = Int(UInt64(t) * slice)..<Int(UInt64(t + 1) * slice)
                let bad = data[range].first { $0 != 0x77 && $0 != UInt8(t + 1) }
                #expect(bad == nil, "thread \(t)'s range holds a foreign byte \(String(describing: bad))")
            }
        }
    }

    /// Readers racing an allocating writer: with 512 B clusters every region of the chain
    /// index (64 KiB) is new to both sides, so a reader resolves the region the writer is
    /// allocating an L2 table in at that moment. A read must never fail (a reader once saw
    /// the new L1 entry before the layer's file end covered the new table, and failed
    /// with "lies beyond the end of the file") and must see each byte old or new.
    @Test("readers racing allocating writers never fail and see old or new bytes")
    func readersRaceAllocatingWriters() async throws {
        try await withTempDir("race") { dir in
            _ = try await qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "race.qcow2", "256M"], cwd: dir)
            let disk = try DiskImage.open(path: dir + "/race.qcow2", options: OpenOptions(writable: true))
            let region: UInt64 = 64 << 10
            let regions = 4096
            let failures = FailureBox()
            let target = SharedCounter()
            DispatchQueue.concurrentPerform(iterations: 3) { t in
                if t == 0 {
                    let buffer = [UInt8](repeating: 0xA5, count: 4096)
                    for k in 0..<regions {
                        target.set(k)
                        do {
                            try buffer.withUnsafeBytes { try disk.write(at: UInt64(k) * region, from: $0) }
                            if k % 512 == 511 { try disk.flush() }
                        } catch { failures.add("writer: \(error)") }
                    }
                    target.set(-1)
                } else {
                    var readBack = [UInt8](repeating: 0, count: Int(region))
                    var k = target.value
                    while k >= 0 {
                        do {
                            try readBack.withUnsafeMutableBytes { try disk.read(at: UInt64(k) * region, into: $0) }
                            if let bad = readBack.first(where: { $0 != 0 && $0 != 0xA5 }) {
                                failures.add("reader \(t): foreign byte \(bad) in region \(k)")
                            }
                        } catch { failures.add("reader \(t): \(error)") }
                        k = target.value
                    }
                }
            }
            try disk.close()
            let messages = failures.messages
            #expect(messages.count == 0, "\(messages.count) failures: \(messages.prefix(3))")
            let check = try await run("qemu-img", ["check", "race.qcow2"], cwd: dir, timeout: 60)
            #expect(check.status == 0, "qemu-img check after the race: \(check.stdout)\(check.stderr)")
        }
    }
}

extension ConcurrencyTests {
    /// Threads writing disjoint bytes of the same clusters at once: every write allocates
    /// (copy-on-write from the backing file), and allocations run outside the metadata
    /// lock, so a write must wait for another's allocation of the same cluster or it
    /// would copy stale bytes over the other's data.
    @Test("threads sharing clusters (disjoint bytes) lose no write", arguments: ["cluster_size=4096", "cluster_size=65536", "cluster_size=512"])
    func sharedClusters(_ options: String) async throws {
        try await withTempDir("shared-clusters") { dir in
            _ = try await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "base.qcow2", "8M"], cwd: dir)
            try await qemuIO(dir + "/base.qcow2", ["write -P 0x77 0 8M"], cwd: dir)
            _ = try await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], cwd: dir)
            let disk = try DiskImage.open(path: dir + "/top.qcow2", options: OpenOptions(writable: true))
            let threads = 4
            let chunk = 128  // thread t owns bytes [t*128, t*128+128) of every 512-byte block
            let size = 8 << 20
            let failures = FailureBox()
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                var rng = WSplitMix64(seed: UInt64(t) &+ 99)
                let buffer = [UInt8](repeating: UInt8(0xA0 + t), count: chunk)
                for i in 0..<3000 {
                    let block = Int(rng.next() % UInt64(size / 512))
                    do {
                        try buffer.withUnsafeBytes { try disk.write(at: UInt64(block * 512 + t * chunk), from: $0) }
                        if i % 1000 == 999 { try disk.flush() }
                    } catch { failures.add("thread \(t): \(error)") }
                }
            }
            try disk.close()
            let messages = failures.messages
            #expect(messages.count == 0, "\(messages.count) failures: \(messages.prefix(3))")
            let check = try await run("qemu-img", ["check", "top.qcow2"], cwd: dir, timeout: 60)
            #expect(check.status == 0, "qemu-img check: \(check.stdout)\(check.stderr)")
            // Replay the same writes sequentially into a model.
            var model = [UInt8](repeating: 0x77, count: size)
            for t in 0..<threads {
                var rng = WSplitMix64(seed: UInt64(t) &+ 99)
                for _ in 0..<3000 {
                    let block = Int(rng.next() % UInt64(size / 512))
                    for k in 0..<chunk { model[block * 512 + t * chunk + k] = UInt8(0xA0 + t) }
                }
            }
            _ = try await qemuImg(["convert", "-O", "raw", "top.qcow2", "top.raw"], cwd: dir)
            let data = try Data(contentsOf: URL(fileURLWithPath: dir + "/top.raw"))
            let firstBad = zip(data.indices, model.indices).first { data[$0.0] != model[$0.1] }
            #expect(firstBad == nil, "first lost byte at \(String(describing: firstBad?.0))")
        }
    }
}

/// An integer one thread publishes and others poll.
final class SharedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var current = 0
    func set(_ v: Int) { lock.lock(); current = v; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return current }
}

/// Collects failure messages from several threads.
final class FailureBox: @unchecked Sendable {
    private let lock = NSLock()
    private var list: [String] = []
    func add(_ m: String) { lock.lock(); list.append(m); lock.unlock() }
    var messages: [String] { lock.lock(); defer { lock.unlock() }; return list }
}
