import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Crash consistency under SIGKILL (issue 7, "Crash tests").
//
// A child process (`qcow2 io` with a random workload, or a chain of `qcow2 snapshot` /
// `qcow2 resize` / `qcow2 io` processes) is killed with SIGKILL at a random moment, or
// ends itself with `-c abort` (no flush, no close). Then, judged by QEMU's tools:
//
// 1. `qemu-img check` reports no corruption (exit 0, or 3 for leaks);
// 2. every byte written before the last *completed* flush, and not touched by any command
//    that may have started after it, reads back exactly (`qemu-img convert -O raw`);
// 3. the image reopens read-write with our engine (an allocating write, read back), after
//    which `qemu-img check` is again clean (this exercises the dirty-bit refcount rebuild for
//    lazy refcounts) and the whole model still reads back.
//
// Which commands completed is read from the child's stdout: `qcow2 io` prints a line per
// completed write/discard (`flush` and `sleep` print nothing), so a flush completed when a
// later command's line was printed. stdout is line-buffered with coreutils `stdbuf -oL`; a
// command whose line is missing is treated as possibly in flight.
//
// Every iteration prints `[crash] … seed=0x…`. Replay one with
//   QCOW2_CRASH_SEED=0x… [QCOW2_CRASH_VARIANT='name'] QCOW2_KEEP_TMP=1 swift test --filter CrashTests
// (the same workload and kill delay; the exact kill point depends on timing). Run longer with
// QCOW2_CRASH_ITERATIONS=N (iterations per variant; default 20 for the io workloads, half
// that for the snapshot/resize chains). A failed iteration's files (the crashed image, the
// image before the workload, `replay.sh`, `failure.txt`) are copied to
// $TMPDIR/qcow2-crash-failures/. QCOW2_CRASH_NO_COMPRESSED=1 leaves out compressed writes.

// MARK: - Killable child processes

enum CrashProcess {
    struct Exit: CustomStringConvertible {
        var code: Int32?
        var signal: Int32?
        var description: String { signal.map { "signal \($0)" } ?? "exit \(code ?? -1)" }
    }

    /// posix_spawn `argv` with stdout/stderr redirected to files (stdin /dev/null); in a
    /// new process group when `newGroup` (so the whole group can be killed).
    static func spawn(_ argv: [String], stdout: String, stderr: String, newGroup: Bool) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var flags = Int32(POSIX_SPAWN_SETSIGMASK) | Int32(POSIX_SPAWN_SETSIGDEF)
        var noSignals = sigset_t()
        sigemptyset(&noSignals)
        posix_spawnattr_setsigmask(&attr, &noSignals)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGPIPE, SIGABRT, SIGINT, SIGTERM, SIGCHLD] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigdefault(&attr, &defaults)
        if newGroup {
            flags |= Int32(POSIX_SPAWN_SETPGROUP)
            posix_spawnattr_setpgroup(&attr, 0)
        }
        posix_spawnattr_setflags(&attr, Int16(flags))
        var env = ProcessInfo.processInfo.environment
        env["SWIFT_BACKTRACE"] = "enable=no"  // `abort` should just end the process
        let envStrings = env.map { "\($0.key)=\($0.value)" }
        let cArgs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        let cEnv: [UnsafeMutablePointer<CChar>?] = envStrings.map { strdup($0) } + [nil]
        defer {
            for p in cArgs { free(p) }
            for p in cEnv { free(p) }
        }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, argv[0], &actions, &attr, cArgs, cEnv)
        guard rc == 0 else { throw CrashFailure("posix_spawn \(argv[0]) failed: errno \(rc)") }
        return pid
    }

    static func decode(_ status: Int32) -> Exit {
        let sig = status & 0x7f
        if sig == 0 { return Exit(code: (status >> 8) & 0xff, signal: nil) }
        return Exit(code: nil, signal: sig)
    }

    /// Waits up to `ms` for `pid`; nil when it is still running.
    static func wait(_ pid: pid_t, upTo ms: Int) async throws -> Exit? {
        let deadline = DispatchTime.now().uptimeNanoseconds + UInt64(ms) * 1_000_000
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid { return decode(status) }
            if r < 0 && errno != EINTR { throw CrashFailure("waitpid(\(pid)) failed: errno \(errno)") }
            if DispatchTime.now().uptimeNanoseconds >= deadline { return nil }
            try await Task.sleep(nanoseconds: 500_000)
        }
    }

    /// SIGKILL (the group when `group`) and reap.
    static func kill9(_ pid: pid_t, group: Bool) -> Exit {
        _ = kill(group ? -pid : pid, SIGKILL)
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        return decode(status)
    }

    /// `kill9` reaps only the group leader (`sh` running a chain); the other members (the
    /// `qcow2` it started) are reparented and die on their own, which under load can take
    /// a while (a process in fsync finishes the call first). Until one has exited it still
    /// holds its image lock and may still write: `qemu-img check` then failed with "Failed to
    /// get shared "write" lock" (the chain test's flaky iteration). Waits until no member is
    /// alive (a zombie has closed its files).
    static func waitForGroupToDie(_ pgid: pid_t, timeoutMs: Int = 60_000) async throws {
        let start = DispatchTime.now().uptimeNanoseconds
        let deadline = start + UInt64(timeoutMs) * 1_000_000
        var waited = false
        while groupHasLiveMembers(pgid) {
            if DispatchTime.now().uptimeNanoseconds >= deadline {
                throw CrashFailure("process group \(pgid) still has live members \(timeoutMs) ms after SIGKILL")
            }
            waited = true
            try await Task.sleep(nanoseconds: 2_000_000)
        }
        if waited {
            print("[crash] a process of the killed group lived on for \((DispatchTime.now().uptimeNanoseconds - start) / 1_000_000) ms after its leader was reaped")
        }
    }

    /// True while a process of group `pgid` is alive (zombies do not count).
    static func groupHasLiveMembers(_ pgid: pid_t) -> Bool {
        #if os(Linux)
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return kill(-pgid, 0) == 0 }
        for e in entries where e.first?.isNumber == true {
            guard let stat = try? String(contentsOfFile: "/proc/\(e)/stat", encoding: .utf8),
                  let close = stat.lastIndex(of: ")") else { continue }
            // "pid (comm) state ppid pgrp …"; comm may contain spaces and parentheses.
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count >= 3, Int32(fields[2]) == pgid else { continue }
            if fields[0] != "Z" && fields[0] != "X" { return true }
        }
        return false
        #else
        return kill(-pgid, 0) == 0  // zombies count here: at worst a longer wait
        #endif
    }

    /// Starts `argv`, lets it run `killAfterMs` (nil: to completion, up to 120 s), then kills it.
    /// With `armOnOutput` the delay starts when the child has printed something (so process
    /// start-up does not eat the window), at most 10 s after the start.
    static func runAndKill(_ argv: [String], dir: String, killAfterMs: Int?, group: Bool, armOnOutput: Bool = false) async throws
        -> (exit: Exit, killed: Bool, stdout: String, stderr: String, elapsedMs: Int)
    {
        let out = dir + "/child.out", err = dir + "/child.err"
        let start = DispatchTime.now().uptimeNanoseconds
        let pid = try spawn(argv, stdout: out, stderr: err, newGroup: group)
        var exit: Exit?
        if armOnOutput, killAfterMs != nil {
            for _ in 0..<20_000 {
                if let e = try await wait(pid, upTo: 0) { exit = e; break }
                if ((try? fileSize(out)) ?? 0) > 0 { break }
                try await Task.sleep(nanoseconds: 500_000)
            }
        }
        if exit == nil { exit = try await wait(pid, upTo: killAfterMs ?? 120_000) }
        var killed = false
        if exit == nil {
            exit = kill9(pid, group: group)
            killed = exit?.signal == SIGKILL  // it may have exited just before the signal
            if group { try await waitForGroupToDie(pid) }
        }
        let elapsed = Int((DispatchTime.now().uptimeNanoseconds - start) / 1_000_000)
        let stdout = (try? String(contentsOfFile: out, encoding: .utf8)) ?? ""
        let stderr = (try? String(contentsOfFile: err, encoding: .utf8)) ?? ""
        return (exit!, killed, stdout, stderr, elapsed)
    }

    /// coreutils stdbuf, to make the child's stdout line-buffered (nil when missing).
    static let stdbuf: String? = ["/usr/bin/stdbuf", "/bin/stdbuf"].first { FileManager.default.isExecutableFile(atPath: $0) }
}

struct CrashFailure: Error, CustomStringConvertible {
    var description: String
    init(_ d: String) { description = d }
}

// MARK: - Byte ranges

/// Half-open byte ranges; `unknown` ranges are excluded from the comparison.
struct CrashRanges {
    var list: [(Int, Int)] = []
    mutating func add(_ start: Int, _ end: Int) { if end > start { list.append((start, end)) } }

    /// [0, size) minus the union of `list`.
    func complement(size: Int) -> [(Int, Int)] {
        let sorted = list.map { (max(0, $0.0), min(size, $0.1)) }.filter { $0.1 > $0.0 }.sorted { $0.0 < $1.0 }
        var out: [(Int, Int)] = []
        var pos = 0
        for (s, e) in sorted {
            if s > pos { out.append((pos, s)) }
            pos = max(pos, e)
        }
        if pos < size { out.append((pos, size)) }
        return out
    }
}

/// First offset in `ranges` where `actual` differs from `expected` (memcmp per range).
func crashFirstMismatch(_ expected: [UInt8], _ actual: [UInt8], in ranges: [(Int, Int)]) -> Int? {
    for (s, e) in ranges {
        guard e <= actual.count, e <= expected.count else { return min(s, actual.count) }
        let differ = expected.withUnsafeBytes { a in
            actual.withUnsafeBytes { b in memcmp(a.baseAddress! + s, b.baseAddress! + s, e - s) != 0 }
        }
        if differ {
            var i = s
            while expected[i] == actual[i] { i += 1 }
            return i
        }
    }
    return nil
}

func crashHex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }

/// Copies a failed iteration's directory (the crashed image as `crashed.qcow2`, backing
/// files, the child's output) to $TMPDIR/qcow2-crash-failures/ and returns the path.
func crashPreserve(_ dir: String, variant: String, seed: UInt64, failure: String) -> String {
    try? writeFile(dir + "/failure.txt", Data(failure.utf8))
    let root = FileManager.default.temporaryDirectory.appendingPathComponent("qcow2-crash-failures").path
    let name = variant.map { $0.isLetter || $0.isNumber ? $0 : "-" } + "-" + crashHex(seed)
    let dest = root + "/" + String(name)
    try? FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    try? FileManager.default.removeItem(atPath: dest)
    try? FileManager.default.copyItem(atPath: dir, toPath: dest)
    return dest
}

// MARK: - Judges

/// `qemu-img check` verdict: nil when acceptable (exit 0 or 3), else a description.
/// `cautiousCopiedOK` also accepts errors that are only OFLAG_COPIED flags *cleared* on
/// clusters whose refcount is 1 (the window inside a snapshot create: copied flags are
/// cleared before refcounts rise; such an image cannot lose data, writes just copy first).
func crashCheckVerdict(_ image: String, cwd: String, cautiousCopiedOK: Bool) async throws -> (String?, cautious: Bool) {
    let r = try await run("qemu-img", ["check", "-f", "qcow2", image], cwd: cwd, timeout: 120)
    if r.status == 0 || r.status == 3 { return (nil, false) }
    let text = r.stdout + "\n" + r.stderr
    if cautiousCopiedOK && r.status == 2 && crashOnlyCautiousCopiedFlags(text) { return (nil, true) }
    return ("qemu-img check exit \(r.status.map(String.init) ?? "signal"):\n\(text.prefix(3000))", false)
}

func crashOnlyCautiousCopiedFlags(_ output: String) -> Bool {
    let errors = output.split(separator: "\n").filter { $0.hasPrefix("ERROR") }
    guard !errors.isEmpty else { return false }
    return errors.allSatisfy { line in
        guard line.hasPrefix("ERROR OFLAG_COPIED"), line.hasSuffix("refcount=1") else { return false }
        guard let eq = line.range(of: line.contains("l1_entry=") ? "l1_entry=" : "l2_entry=") else { return false }
        let hex = line[eq.upperBound...].prefix { $0.isHexDigit }
        guard let value = UInt64(hex, radix: 16) else { return false }
        return value & (1 << 63) == 0
    }
}

/// Incompatible feature bit 0 of a v3 image (v2 has no feature fields).
func crashDirtyBit(_ path: String) -> Bool {
    guard (try? readBE32(path, at: 4)) == 3 else { return false }
    return ((try? readBE64(path, at: 72)) ?? 0) & 1 == 1
}

/// Guest bytes via `qemu-img convert -O raw` (optionally of an internal snapshot).
func crashRaw(_ image: String, cwd: String, snapshot: String? = nil) async throws -> [UInt8] {
    let scratch = cwd + "/scratch-\(UInt32.random(in: 0...UInt32.max)).raw"
    var args = ["convert", "-f", "qcow2", "-O", "raw"]
    if let snapshot { args += ["-l", "snapshot.name=" + snapshot] }
    try await qemuImg(args + [image, scratch], cwd: cwd)
    defer { try? FileManager.default.removeItem(atPath: scratch) }
    return [UInt8](try readFile(scratch))
}

/// Snapshot names and virtual size from `qemu-img info --output=json`.
func crashInfo(_ image: String, cwd: String) async throws -> (names: Set<String>, size: Int) {
    let out = try await qemuImg(["info", "-f", "qcow2", "--output=json", image], cwd: cwd)
    let obj = try #require(try parseJSON(out, "qemu-img info") as? [String: Any])
    let snaps = (obj["snapshots"] as? [[String: Any]]) ?? []
    return (Set(snaps.compactMap { $0["name"] as? String }), (obj["virtual-size"] as? NSNumber)?.intValue ?? -1)
}

// MARK: - Variants

struct CrashVariant: Sendable, CustomStringConvertible {
    enum Backing: Sendable { case none, qcow2, raw }
    var name: String
    var options: String
    var size: Int
    var clusterSize: Int
    var backing: Backing = .none
    var v3 = true
    var description: String { name }
}

@Suite("Reliability: SIGKILL crash consistency")
struct CrashTests {
    static let ioVariants: [CrashVariant] = [
        .init(name: "64k clusters", options: "cluster_size=65536", size: 8 << 20, clusterSize: 65536),
        .init(name: "lazy refcounts", options: "lazy_refcounts=on", size: 8 << 20, clusterSize: 65536),
        .init(name: "4k clusters, qcow2 backing", options: "cluster_size=4096", size: 8 << 20, clusterSize: 4096, backing: .qcow2),
        .init(name: "lazy refcounts, 16k clusters, raw backing", options: "lazy_refcounts=on,cluster_size=16384",
              size: 8 << 20, clusterSize: 16384, backing: .raw),
        // 64-bit refcounts in 512 B clusters: one refcount table cluster covers 2 MiB of file,
        // so the table grows (new refblocks + new table + header switch) during the workload.
        .init(name: "512 B clusters, 64-bit refcounts (refcount table growth)", options: "cluster_size=512,refcount_bits=64",
              size: 6 << 20, clusterSize: 512),
        .init(name: "512 B clusters, 64-bit refcounts, lazy", options: "cluster_size=512,refcount_bits=64,lazy_refcounts=on",
              size: 4 << 20, clusterSize: 512),
        .init(name: "extended L2, qcow2 backing", options: "extended_l2=on,cluster_size=65536", size: 8 << 20,
              clusterSize: 65536, backing: .qcow2),
        .init(name: "compat 0.10, raw backing", options: "compat=0.10,cluster_size=8192", size: 8 << 20,
              clusterSize: 8192, backing: .raw, v3: false),
    ]

    static let chainVariants: [CrashVariant] = [
        .init(name: "snapshots+resize, 512 B clusters", options: "cluster_size=512", size: 3 << 20, clusterSize: 512),
        .init(name: "snapshots+resize, lazy refcounts, 4k clusters", options: "lazy_refcounts=on,cluster_size=4096",
              size: 8 << 20, clusterSize: 4096),
    ]

    static var iterations: Int {
        if let s = ProcessInfo.processInfo.environment["QCOW2_CRASH_ITERATIONS"], let n = Int(s), n > 0 { return n }
        return 20
    }

    /// The iteration seeds of a variant: one fixed by QCOW2_CRASH_SEED, else random per run.
    static func seeds(_ variant: CrashVariant, count: Int) -> [UInt64] {
        let env = ProcessInfo.processInfo.environment
        if let v = env["QCOW2_CRASH_VARIANT"], !v.isEmpty, v != variant.name { return [] }
        if let s = env["QCOW2_CRASH_SEED"], !s.isEmpty {
            let t = s.hasPrefix("0x") ? String(s.dropFirst(2)) : s
            return UInt64(t, radix: s.hasPrefix("0x") ? 16 : 10).map { [$0] } ?? []
        }
        var g = SystemRandomNumberGenerator()
        return (0..<count).map { _ in g.next() }
    }

    // MARK: io workloads

    /// One command of the generated workload, with the guest range it touches.
    struct Step {
        var command: String
        var op: WOp?
        var range: (Int, Int)?
        var printsLine: Bool
    }

    struct Setup {
        var model: WModel
        var touchedClusters: Set<Int>
    }

    /// Creates the image (and its backing file), pre-populated through qemu-io; returns the model.
    static func prepare(_ v: CrashVariant, dir: String, rng: inout WSplitMix64) async throws -> Setup {
        var backingBytes: [UInt8]?
        var createArgs = ["create", "-q", "-f", "qcow2", "-o", v.options]
        if v.backing != .none {
            let baseSize = rng.chance(50) ? v.size : v.size / 2
            var base = [UInt8](repeating: 0, count: baseSize)
            var cmds: [String] = []
            for _ in 0..<(4 + rng.below(6)) {
                let len = 1 + rng.below(min(baseSize, 512 << 10))
                let off = rng.below(baseSize - len + 1)
                let p = UInt8(1 + rng.below(255))
                for i in off..<(off + len) { base[i] = p }
                cmds.append("write -P 0x\(String(p, radix: 16)) \(off) \(len)")
            }
            if v.backing == .qcow2 {
                try await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", String(baseSize)], cwd: dir)
                try await qemuIO(dir + "/base.qcow2", cmds, cwd: dir)
                createArgs += ["-b", "base.qcow2", "-F", "qcow2"]
            } else {
                try writeFile(dir + "/base.raw", Data(base))
                createArgs += ["-b", "base.raw", "-F", "raw"]
            }
            backingBytes = base
        }
        try await qemuImg(createArgs + ["img.qcow2", String(v.size)], cwd: dir)
        var model = WModel(size: v.size, clusterSize: v.clusterSize, v3: v.v3, backing: backingBytes)
        // Some data in the image before the workload, written by QEMU (so the workload also
        // overwrites, COWs and frees existing clusters, and compressed clusters).
        var touched = Set<Int>()
        var cmds: [String] = []
        let workEnd = v.size - postZone(v)
        for _ in 0..<(2 + rng.below(5)) {
            let len = 1 + rng.below(256 << 10)
            let off = rng.below(workEnd - len)
            let op = WOp.write(offset: off, length: len, pattern: UInt8(1 + rng.below(255)))
            cmds.append(op.command)
            model.apply(op)
            for c in (off / v.clusterSize)...((off + len - 1) / v.clusterSize) { touched.insert(c) }
        }
        var c0 = rng.below(workEnd / v.clusterSize - 2)
        while touched.contains(c0) { c0 = (c0 + 1) % (workEnd / v.clusterSize - 2) }
        let cop = WOp.compressed(offset: c0 * v.clusterSize, length: v.clusterSize, pattern: UInt8(1 + rng.below(255)))
        cmds.append(cop.command)
        model.apply(cop)
        touched.insert(c0)
        try await qemuIO(dir + "/img.qcow2", cmds, cwd: dir)
        return Setup(model: model, touchedClusters: touched)
    }

    /// Bytes at the end of the disk the workload never touches: the post-crash reopen writes there.
    static func postZone(_ v: CrashVariant) -> Int { max(2 * v.clusterSize, 64 << 10) }

    /// QCOW2_CRASH_NO_COMPRESSED=1 leaves compressed writes out of the workloads (to look
    /// past a known compressed-allocation bug).
    static let noCompressed = ProcessInfo.processInfo.environment["QCOW2_CRASH_NO_COMPRESSED"] == "1"

    static func generate(_ v: CrashVariant, touched: inout Set<Int>, rng: inout WSplitMix64, count: Int) -> [Step] {
        let c = v.clusterSize
        let workEnd = v.size - postZone(v)
        let compressedZone = ((workEnd * 3 / 4) / c)..<(workEnd / c)
        var steps: [Step] = []
        func randomRange(maxLen: Int) -> (Int, Int) {
            switch rng.below(10) {
            case 0..<4:  // small and unaligned
                let len = 1 + rng.below(min(maxLen, 6000))
                return (rng.below(workEnd - len), len)
            case 4..<8:  // cluster aligned
                let n = 1 + rng.below(max(1, min(maxLen, 256 << 10) / c))
                let len = min(n * c, workEnd - c)
                return (rng.below((workEnd - len) / c + 1) * c, len)
            default:  // large, sector aligned
                let len = 512 * (1 + rng.below(maxLen / 512))
                return (512 * rng.below((workEnd - len) / 512 + 1), len)
            }
        }
        func touch(_ o: Int, _ l: Int) { for k in (o / c)...((o + l - 1) / c) { touched.insert(k) } }
        while steps.count < count {
            let r = rng.below(100)
            switch r {
            case 0..<42:
                let (o, l) = randomRange(maxLen: 256 << 10)
                let op = WOp.write(offset: o, length: l, pattern: UInt8(1 + rng.below(255)))
                steps.append(Step(command: op.command, op: op, range: (o, o + l), printsLine: true))
                touch(o, l)
            case 42..<54:
                let (o, l) = randomRange(maxLen: 512 << 10)
                let op = WOp.zero(offset: o, length: l, unmap: rng.chance(50))
                steps.append(Step(command: op.command, op: op, range: (o, o + l), printsLine: true))
                touch(o, l)
            case 54..<63:
                let (o, l) = randomRange(maxLen: 512 << 10)
                let op = WOp.discard(offset: o, length: l)
                steps.append(Step(command: op.command, op: op, range: (o, o + l), printsLine: true))
                touch(o, l)
            case 63..<72:
                // Compressed: whole, never-touched clusters.
                if noCompressed { continue }
                let n = 1 + rng.below(c >= 65536 ? 2 : (c >= 4096 ? 4 : 16))
                var found: Int?
                for _ in 0..<20 {
                    let k = compressedZone.lowerBound + rng.below(max(1, compressedZone.count - n))
                    if k + n <= compressedZone.upperBound, (k..<(k + n)).allSatisfy({ !touched.contains($0) }) {
                        found = k
                        break
                    }
                }
                guard let k = found else { continue }
                let op = WOp.compressed(offset: k * c, length: n * c, pattern: UInt8(1 + rng.below(255)))
                steps.append(Step(command: op.command, op: op, range: (k * c, (k + n) * c), printsLine: true))
                touch(k * c, n * c)
            case 72..<85:
                steps.append(Step(command: "flush", op: .flush, range: nil, printsLine: false))
            default:
                steps.append(Step(command: "sleep \(2 + rng.below(40))", op: nil, range: nil, printsLine: false))
            }
        }
        return steps
    }

    struct Outcome {
        var killed = false
        var aborted = false
        var completed = false
        var cautious = false
        var checkedBytes = 0
        var lastFlush = -1
    }

    @Test("SIGKILL / abort during a random io workload", arguments: ioVariants)
    func ioWorkload(_ variant: CrashVariant) async throws {
        try #require(FileManager.default.isExecutableFile(atPath: QCOW2Binary.path), "build qcow2 first (`swift build`)")
        let seeds = Self.seeds(variant, count: Self.iterations)
        var summary: [String: Int] = [:]
        for (i, seed) in seeds.enumerated() {
            let ok = try await withTempDir("crash-io") { dir -> Bool in
                let (outcome, failure) = try await Self.ioIteration(variant, seed: seed, index: i, dir: dir)
                if let failure {
                    let kept = crashPreserve(dir, variant: variant.name, seed: seed, failure: failure)
                    Issue.record("""
                        [crash] \(variant.name) iteration \(i) seed=\(crashHex(seed)) FAILED \
                        (replay: QCOW2_CRASH_SEED=\(crashHex(seed)) QCOW2_CRASH_VARIANT='\(variant.name)'; files kept in \(kept))
                        \(failure)
                        """)
                    return false
                }
                summary[outcome.completed ? "completed" : outcome.aborted ? "aborted" : "killed", default: 0] += 1
                summary["checked MiB", default: 0] += outcome.checkedBytes >> 20
                return true
            }
            if !ok { break }
        }
        print("[crash] \(variant.name): \(seeds.count) iterations \(summary.sorted { $0.key < $1.key })")
    }

    static func ioIteration(_ v: CrashVariant, seed: UInt64, index: Int, dir: String) async throws -> (Outcome, String?) {
        var rng = WSplitMix64(seed: seed)
        let setup = try await prepare(v, dir: dir, rng: &rng)
        var touched = setup.touchedClusters
        var steps = generate(v, touched: &touched, rng: &rng, count: 50 + rng.below(30))
        var outcome = Outcome()
        // A first command that prints at once: the kill delay starts when the workload does.
        steps.insert(Step(command: "read 0 512", op: nil, range: nil, printsLine: true), at: 0)
        let abortAt: Int? = rng.chance(25) ? 5 + rng.below(steps.count - 5) : nil
        if let a = abortAt { steps.insert(Step(command: "abort", op: nil, range: nil, printsLine: false), at: a) }
        let killDelay = 5 + rng.below(296)
        let image = dir + "/img.qcow2"
        try wCopy(image, dir + "/before.qcow2")
        let replay = "#!/bin/sh\n# the workload on a copy of the image before it (abort and sleeps included)\ncp before.qcow2 replay.qcow2\n"
            + ([QCOW2Binary.path, "io", "-f", "qcow2"] + steps.flatMap { ["-c", $0.command] } + ["replay.qcow2"]).map(shellQuote).joined(separator: " ") + "\n"
        try writeFile(dir + "/replay.sh", Data(replay.utf8))

        var argv = ["/bin/sh", "-c", "ulimit -c 0; exec \"$@\"", "sh"]
        if let s = CrashProcess.stdbuf { argv += [s, "-oL"] }
        argv += [QCOW2Binary.path, "io", "-f", "qcow2"]
        for s in steps { argv += ["-c", s.command] }
        argv.append(image)
        let r = try await CrashProcess.runAndKill(argv, dir: dir, killAfterMs: abortAt == nil ? killDelay : nil, group: false,
                                                   armOnOutput: CrashProcess.stdbuf != nil)
        outcome.killed = r.killed
        let header = "[crash] \(v.name) #\(index) seed=\(crashHex(seed)) kill=\(abortAt == nil ? "\(killDelay)ms" : "abort@\(abortAt!)")"
        func fail(_ what: String) -> (Outcome, String?) {
            let cmds = steps.enumerated().map { "  \($0.offset): \($0.element.command)" }.joined(separator: "\n")
            return (outcome, "\(what)\nchild: \(r.exit) after \(r.elapsedMs) ms\nstdout tail:\n\(r.stdout.suffix(1500))\nstderr:\n\(r.stderr.prefix(1500))\ncommands:\n\(cmds)")
        }
        if r.stdout.contains("failed") {
            return fail("a workload command failed")
        }

        // Which commands certainly completed, and which may have started.
        let lines = r.stdout.split(separator: "\n")
        let done = lines.filter { $0.hasPrefix("wrote ") || $0.hasPrefix("discard ") || $0.hasPrefix("read ") }.count
        let printing = steps.indices.filter { steps[$0].printsLine }
        var doneThrough: Int        // every command with index <= doneThrough completed
        var mayHaveStarted: Int     // no command with a larger index started
        if let a = abortAt {
            guard r.exit.signal == SIGABRT else { return fail("`abort` did not end the process with SIGABRT") }
            guard done == printing.filter({ $0 < a }).count else { return fail("not every command before `abort` printed its line") }
            outcome.aborted = true
            doneThrough = a - 1
            mayHaveStarted = a - 1
        } else if !r.killed {
            guard r.exit.code == 0 else { return fail("the workload exited with \(r.exit) before the kill") }
            guard done == printing.count else { return fail("a command printed no line") }
            outcome.completed = true
            doneThrough = steps.count  // close() flushed everything
            mayHaveStarted = steps.count
        } else {
            guard r.exit.signal == SIGKILL, done <= printing.count else { return fail("unexpected end: \(r.exit), \(done) lines") }
            doneThrough = done > 0 ? printing[done - 1] : -1
            if CrashProcess.stdbuf != nil {
                mayHaveStarted = done < printing.count ? printing[done] : steps.count - 1
            } else {
                mayHaveStarted = steps.count - 1
            }
        }
        // The last flush that completed; everything before it is durable.
        var durable = -1
        if outcome.completed {
            durable = steps.count
        } else {
            for (k, s) in steps.enumerated() where s.command == "flush" && k <= doneThrough { durable = k }
        }
        outcome.lastFlush = durable
        var model = setup.model
        for k in 0..<max(0, min(durable, steps.count)) { if let op = steps[k].op { model.apply(op) } }
        var unknown = CrashRanges()
        if durable < steps.count {
            for k in (durable + 1)..<steps.count where k <= mayHaveStarted {
                if let (s, e) = steps[k].range { unknown.add(s, e) }
            }
        }
        let known = unknown.complement(size: v.size)
        outcome.checkedBytes = known.reduce(0) { $0 + $1.1 - $1.0 }

        // 1. No corruption.
        try wCopy(image, dir + "/crashed.qcow2")
        let dirty = crashDirtyBit(image)
        let (bad, _) = try await crashCheckVerdict(image, cwd: dir, cautiousCopiedOK: false)
        if let bad { return fail("\(header): crashed image (dirty bit \(dirty)) is corrupt: \(bad)") }

        // 2. Flushed data reads back.
        let bytes = try await crashRaw(image, cwd: dir)
        if bytes.count != v.size { return fail("\(header): virtual size \(bytes.count) != \(v.size)") }
        if let at = crashFirstMismatch(model.bytes, bytes, in: known) {
            let writer = (0..<max(0, durable)).last { k in steps[k].range.map { $0.0 <= at && at < $0.1 } ?? false }
            return fail("""
                \(header): flushed data lost at guest offset \(at) (\(crashHex(UInt64(at)))): expected \
                0x\(String(model.bytes[at], radix: 16)), read 0x\(String(bytes[at], radix: 16)); last flush = command \(durable), \
                last durable writer = \(writer.map { "command \($0): \(steps[$0].command)" } ?? "setup/backing")
                """)
        }

        // 3. Reopen read-write: an allocating write into the untouched tail, then clean.
        let post = postZone(v)
        let pOff = v.size - post + 512 * rng.below(post / 1024)
        let pLen = 512 * (1 + rng.below((v.size - pOff) / 512))
        let pOp = WOp.write(offset: pOff, length: pLen, pattern: 0xA5)
        let reopen = try await qcow2(["io", "-f", "qcow2", "-c", pOp.command, "-c", "read -P 0xa5 \(pOff) \(pLen)", image], cwd: dir, timeout: 60)
        if !wIOClean(reopen) { return fail("\(header): read-write reopen failed: \(reopen)") }
        if crashDirtyBit(image) { return fail("\(header): dirty bit still set after a clean read-write session") }
        let (bad2, _) = try await crashCheckVerdict(image, cwd: dir, cautiousCopiedOK: false)
        if let bad2 { return fail("\(header): image corrupt after the read-write reopen (dirty bit was \(dirty)): \(bad2)") }
        model.apply(pOp)
        let known2 = known + [(pOff, pOff + pLen)]
        let bytes2 = try await crashRaw(image, cwd: dir)
        if let at = crashFirstMismatch(model.bytes, bytes2, in: known2) {
            return fail("\(header): after the reopen (repair) data differs at \(at): expected 0x\(String(model.bytes[at], radix: 16)), read 0x\(String(bytes2[at], radix: 16))")
        }
        print("\(header) → \(outcome.completed ? "completed" : outcome.aborted ? "aborted" : "killed after \(r.elapsedMs) ms") "
              + "at command \(doneThrough + 1)/\(steps.count), last flush #\(durable), dirty=\(dirty), checked \(outcome.checkedBytes >> 10) KiB: ok")
        return (outcome, nil)
    }

    // MARK: snapshot / resize chains

    /// One process of the chain.
    enum ChainOp {
        case io([WOp])
        case snapshotCreate(String)
        case snapshotDelete(String)
        case resize(Int)   // new size

        func argv(_ image: String) -> [String] {
            switch self {
            case .io(let ops): return ["io", "-f", "qcow2"] + ops.flatMap { ["-c", $0.command] } + [image]
            case .snapshotCreate(let n): return ["snapshot", "-c", n, image]
            case .snapshotDelete(let n): return ["snapshot", "-d", n, image]
            case .resize(let s): return ["resize", "-f", "qcow2", "--shrink", image, String(s)]
            }
        }
    }

    /// The guest content and snapshots a chain of completed operations leaves.
    struct ChainState {
        var bytes: [UInt8]
        var snapshots: [String: [UInt8]] = [:]
        let clusterSize: Int

        mutating func apply(_ op: ChainOp) {
            switch op {
            case .io(let ops):
                var m = WModel(size: bytes.count, clusterSize: clusterSize)
                m.bytes = bytes
                for o in ops { m.apply(o) }
                bytes = m.bytes
            case .snapshotCreate(let n): snapshots[n] = bytes
            case .snapshotDelete(let n): snapshots[n] = nil
            case .resize(let s):
                if s < bytes.count { bytes.removeLast(bytes.count - s) } else { bytes += [UInt8](repeating: 0, count: s - bytes.count) }
            }
        }
    }

    static func chainOps(_ v: CrashVariant, rng: inout WSplitMix64) -> [ChainOp] {
        func io(_ size: Int) -> ChainOp {
            var ops: [WOp] = []
            for _ in 0..<(1 + rng.below(4)) {
                let len = 1 + rng.below(min(size / 4, 400 << 10))
                let off = rng.below(size - len)
                switch rng.below(6) {
                case 0: ops.append(.zero(offset: off, length: len, unmap: rng.chance(50)))
                case 1: ops.append(.discard(offset: off, length: len))
                default: ops.append(.write(offset: off, length: len, pattern: UInt8(1 + rng.below(255))))
                }
            }
            return .io(ops)
        }
        let big = v.size + v.clusterSize * (64 + rng.below(4096)) + (rng.chance(30) ? 8 << 20 : 0)
        let small = v.size - v.clusterSize * rng.below(v.size / v.clusterSize / 4) - 4096
        return [io(v.size), .resize(big), io(big), .snapshotCreate("s1"), io(big), .snapshotCreate("s2"), io(big),
                .snapshotDelete("s1"), io(big), .snapshotDelete("s2"), .resize(small), io(small)]
    }

    @Test("SIGKILL during snapshot create/delete and resize", arguments: chainVariants)
    func chain(_ variant: CrashVariant) async throws {
        try #require(FileManager.default.isExecutableFile(atPath: QCOW2Binary.path), "build qcow2 first (`swift build`)")
        let count = ProcessInfo.processInfo.environment["QCOW2_CRASH_ITERATIONS"] == nil ? max(1, Self.iterations / 2) : Self.iterations
        let seeds = Self.seeds(variant, count: count)
        var fullRunMs = 1500
        var outcomes: [String: Int] = [:]
        for (i, seed) in seeds.enumerated() {
            let ok = try await withTempDir("crash-chain") { dir -> Bool in
                // The first iteration runs to completion (and measures the chain's length).
                let r = try await Self.chainIteration(variant, seed: seed, index: i, dir: dir, killWithin: i == 0 && seeds.count > 1 ? nil : fullRunMs)
                if let failure = r.failure {
                    let kept = crashPreserve(dir, variant: variant.name, seed: seed, failure: failure)
                    Issue.record("""
                        [crash] \(variant.name) iteration \(i) seed=\(crashHex(seed)) FAILED \
                        (replay: QCOW2_CRASH_SEED=\(crashHex(seed)) QCOW2_CRASH_VARIANT='\(variant.name)'; files kept in \(kept))
                        \(failure)
                        """)
                    return false
                }
                if i == 0 && seeds.count > 1 { fullRunMs = max(200, r.elapsedMs) }
                outcomes[r.stage, default: 0] += 1
                return true
            }
            if !ok { break }
        }
        print("[crash] \(variant.name): \(seeds.count) iterations, killed during: \(outcomes.sorted { $0.key < $1.key })")
    }

    static func chainIteration(_ v: CrashVariant, seed: UInt64, index: Int, dir: String, killWithin: Int?) async throws
        -> (failure: String?, elapsedMs: Int, stage: String)
    {
        var rng = WSplitMix64(seed: seed)
        let image = dir + "/img.qcow2"
        try await qemuImg(["create", "-q", "-f", "qcow2", "-o", v.options, "img.qcow2", String(v.size)], cwd: dir)
        // Fill most of the disk (many clusters → long refcount updates in snapshot operations).
        var state = ChainState(bytes: [UInt8](repeating: 0, count: v.size), clusterSize: v.clusterSize)
        var fill: [WOp] = []
        var o = 0
        while o < v.size {
            let len = min(v.size - o, (64 << 10) * (1 + rng.below(4)))
            if rng.below(8) != 0 { fill.append(.write(offset: o, length: len, pattern: UInt8(1 + rng.below(255)))) }
            o += len
        }
        try await qemuIO(image, fill.map(\.command), cwd: dir)
        state.apply(.io(fill))
        let ops = chainOps(v, rng: &rng)
        try wCopy(image, dir + "/before.qcow2")
        let killDelay = killWithin.map { 5 + rng.below(max(1, $0 * 9 / 10)) }

        var script = "ulimit -c 0\n"
        try writeFile(dir + "/replay.sh", Data(("#!/bin/sh\n# the chain on a copy of the image before it\ncp before.qcow2 img.qcow2\n" + ops.map {
            ([QCOW2Binary.path] + $0.argv("img.qcow2")).map(shellQuote).joined(separator: " ") }.joined(separator: "\n") + "\n").utf8))
        for (k, op) in ops.enumerated() {
            let cmd = ([QCOW2Binary.path] + op.argv(image)).map(shellQuote).joined(separator: " ")
            script += "\(cmd) || { echo \"@@FAILED \(k) $?\"; exit 1; }\necho \"@@DONE \(k)\"\n"
        }
        let r = try await CrashProcess.runAndKill(["/bin/sh", "-c", script], dir: dir, killAfterMs: killDelay, group: true)
        let header = "[crash] \(v.name) #\(index) seed=\(crashHex(seed)) kill=\(killDelay.map { "\($0)ms" } ?? "none")"
        var context = ""
        func fail(_ what: String) -> (String?, Int, String) {
            let list = ops.enumerated().map { "  \($0.offset): qcow2 \($0.element.argv("img.qcow2").joined(separator: " "))" }.joined(separator: "\n")
            return ("\(header): \(what)\(context)\nchild: \(r.exit) after \(r.elapsedMs) ms\nstdout tail:\n\(r.stdout.suffix(1500))\nstderr:\n\(r.stderr.prefix(1500))\nchain:\n\(list)", r.elapsedMs, "")
        }
        if r.stdout.contains("@@FAILED") { return fail("an operation of the chain failed") }
        let done = r.stdout.split(separator: "\n").filter { $0.hasPrefix("@@DONE ") }.count
        if !r.killed && (r.exit.code != 0 || done != ops.count) { return fail("the chain ended early") }
        // Completed operations are durable (each process closed the image); ops[done] may be partial.
        for k in 0..<done { state.apply(ops[k]) }
        let inFlight: ChainOp? = done < ops.count ? ops[done] : nil
        let stage: String
        switch inFlight {
        case nil: stage = "none (completed)"
        case .io?: stage = "io"
        case .snapshotCreate?: stage = "snapshot create"
        case .snapshotDelete?: stage = "snapshot delete"
        case .resize?: stage = "resize"
        }

        // 1. No corruption (a clear copied flag with refcount 1 inside a snapshot create is tolerated).
        let dirty = crashDirtyBit(image)
        try wCopy(image, dir + "/crashed.qcow2")
        let (bad, cautious) = try await crashCheckVerdict(image, cwd: dir, cautiousCopiedOK: true)
        if let bad { return fail("crashed image (dirty bit \(dirty), in flight: \(stage)) is corrupt: \(bad)") }
        context = "\n(after \(done) completed operations; in flight: \(stage); crashed image: dirty bit \(dirty), "
            + "check \(cautious ? "found only cleared copied flags (tolerated)" : "clean or leaks only"))"

        // 2. Snapshots and size as expected; contents read back.
        let info = try await crashInfo(image, cwd: dir)
        var expectedNames = Set(state.snapshots.keys)
        var sizes: Set<Int> = [state.bytes.count]
        var unknown = CrashRanges()
        switch inFlight {
        case .snapshotCreate(let n)?:
            if info.names.contains(n) { expectedNames.insert(n); state.snapshots[n] = state.bytes }
        case .snapshotDelete(let n)?:
            if !info.names.contains(n) { expectedNames.remove(n); state.snapshots[n] = nil }
        case .resize(let s)?:
            sizes.insert(s)
            if info.size == s {
                state.apply(.resize(s))
            } else if s < state.bytes.count {
                // A shrink discards the clusters past the new end before it changes the size.
                unknown.add(s, state.bytes.count)
            }
        case .io(let ops)?:
            for op in ops {
                switch op {
                case let .write(o, l, _), let .compressed(o, l, _), let .zero(o, l, _), let .discard(o, l): unknown.add(o, o + l)
                case .flush: break
                }
            }
        case nil: break
        }
        if info.names != expectedNames { return fail("snapshots \(info.names.sorted()) but expected \(expectedNames.sorted())") }
        if !sizes.contains(info.size) { return fail("virtual size \(info.size), expected one of \(sizes.sorted())") }
        let bytes = try await crashRaw(image, cwd: dir)
        let known = unknown.complement(size: state.bytes.count)
        if bytes.count != state.bytes.count { return fail("guest size \(bytes.count) != \(state.bytes.count)") }
        if let at = crashFirstMismatch(state.bytes, bytes, in: known) {
            return fail("data lost at guest offset \(at): expected 0x\(String(state.bytes[at], radix: 16)), read 0x\(String(bytes[at], radix: 16)) (in flight: \(stage))")
        }
        for (name, content) in state.snapshots.sorted(by: { $0.key < $1.key }) {
            let snap = try await crashRaw(image, cwd: dir, snapshot: name)
            if snap.count != content.count { return fail("snapshot \(name) has size \(snap.count), expected \(content.count)") }
            if let at = crashFirstMismatch(content, snap, in: [(0, content.count)]) {
                return fail("snapshot \(name) differs at \(at): expected 0x\(String(content[at], radix: 16)), read 0x\(String(snap[at], radix: 16))")
            }
        }

        // 3. Reopen read-write, write, clean again.
        let size = info.size
        let pLen = 1 + rng.below(128 << 10)
        let pOff = rng.below(size - pLen)
        let reopen = try await qcow2(["io", "-f", "qcow2", "-c", "write -P 0xa5 \(pOff) \(pLen)", "-c", "read -P 0xa5 \(pOff) \(pLen)", image], cwd: dir, timeout: 60)
        if !wIOClean(reopen) { return fail("read-write reopen failed: \(reopen)") }
        // Cleared copied flags (refcount 1) stay until a repair: a plain read-write open does
        // not repair (as in QEMU), an open of a dirty image does (refcounts and flags).
        let (bad2, _) = try await crashCheckVerdict(image, cwd: dir, cautiousCopiedOK: cautious && !dirty)
        if let bad2 { return fail("image corrupt after the read-write reopen: \(bad2)") }
        var expected = state.bytes
        if expected.count != size { expected = [UInt8](repeating: 0, count: size) }  // unreachable: size checked above
        for i in pOff..<(pOff + pLen) { expected[i] = 0xA5 }
        let bytes2 = try await crashRaw(image, cwd: dir)
        if let at = crashFirstMismatch(expected, bytes2, in: unknown.complement(size: size) + [(pOff, pOff + pLen)]) {
            return fail("after the reopen data differs at \(at)")
        }
        print("\(header) → killed during \(stage) after \(r.elapsedMs) ms (op \(done)/\(ops.count)), dirty=\(dirty)\(cautious ? ", cleared copied flags (tolerated)" : ""): ok")
        return (nil, r.elapsedMs, stage + (cautious ? " (cautious copied flags)" : ""))
    }
}

// MARK: - Deterministic reproductions of what the crash harness found

@Suite("Reliability: crash harness findings (deterministic)")
struct CrashFindingTests {
    /// Found by the io workloads (any layout with compressed writes): the compressed-byte
    /// allocator keeps appending to its partly filled host cluster after that cluster was freed
    /// (its compressed stream overwritten or discarded) and, after a flush, reused for other
    /// data — the next compressed stream overwrites that data (or an L2 table). QEMU 7.2's
    /// qemu-io does the same (so this is judged by content and `qemu-img check`, not by QEMU).
    @Test("a compressed write never lands in a freed and reused cluster", arguments: ["discard 1M 64k", "write -P 0x57 1M 64k"])
    func compressedAfterFree(_ free: String) async throws {
        try #require(FileManager.default.isExecutableFile(atPath: QCOW2Binary.path), "build qcow2 first (`swift build`)")
        try await withTempDir("crash-find-compressed") { dir in
            try await qemuImg(["create", "-q", "-f", "qcow2", "img.qcow2", "8M"], cwd: dir)
            let r = try await wOurIO("img.qcow2", ["write -c -P 0xe1 1M 64k", free, "flush", "write -P 0x48 2M 64k",
                                                   "write -c -P 0x95 3M 64k", "read -P 0x48 2M 64k", "read -P 0x95 3M 64k"], cwd: dir)
            expectSane(r)
            #expect(wIOClean(r), "data written at 2M is overwritten by a later compressed write: \(r)")
            try await wExpectCleanCheck("img.qcow2", cwd: dir, context: "compressed write after `\(free)`")
            try await qemuIO("img.qcow2", ["read -P 0x48 2M 64k", "read -P 0x95 3M 64k"], cwd: dir)
        }
    }

    /// Found by the snapshot chains with lazy refcounts: a crash inside `snapshot -d` (table
    /// already rewritten, refcounts not yet lowered, copied flags still clear) or `snapshot -c`
    /// leaves a dirty image whose only problem is leaks. A read-write open rebuilds the
    /// refcounts but leaves OFLAG_COPIED clear on clusters whose refcount is now 1, so
    /// `qemu-img check` then reports corruption. QEMU's dirty-image repair (a check with
    /// BDRV_FIX_ERRORS | BDRV_FIX_LEAKS) also restores the flags; so does our `check -r all`.
    @Test("opening a dirty image read-write repairs copied flags too")
    func dirtyOpenRepairsCopiedFlags() async throws {
        try #require(FileManager.default.isExecutableFile(atPath: QCOW2Binary.path), "build qcow2 first (`swift build`)")
        try await withTempDir("crash-find-copied") { dir in
            try await qemuImg(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "img.qcow2", "1M"], cwd: dir)
            try await qemuIO(dir + "/img.qcow2", ["write -P 0x11 0 64k"], cwd: dir)
            try await qemuImg(["snapshot", "-c", "s1", "img.qcow2"], cwd: dir)
            // The on-disk state of a crash inside `snapshot -d s1`: table rewritten without s1,
            // refcounts still 2, copied flags clear, dirty bit set.
            try patchBE32(dir + "/img.qcow2", at: 60, 0)
            try patchBE64(dir + "/img.qcow2", at: 72, 1)
            let before = try await run("qemu-img", ["check", "img.qcow2"], cwd: dir)
            try #require(before.status == 3, "judge sanity: the simulated crash state has leaks only: \(before)")
            let r = try await wOurIO("img.qcow2", ["read -P 0x11 0 64k"], cwd: dir)
            expectSuccess(r)
            #expect(!crashDirtyBit(dir + "/img.qcow2"), "the dirty bit is still set after a read-write session")
            try await wExpectCleanCheck("img.qcow2", cwd: dir, context: "dirty image after our read-write open")
        }
    }
}

// MARK: - Sync points of snapshot and resize operations, reopened read-write

/// The deterministic counterpart of the SIGKILL chains: the whole chain runs once with the
/// I/O seam's write log (`QCOW2_IO_LOG`); then prefixes of the log are replayed onto a copy
/// of the image before the chain: every sync point (a power cut right after a sync, when no
/// later write reached the disk) and evenly spaced write boundaries (a SIGKILL: every write
/// issued so far is in the page cache). Each such image must pass `qemu-img check` (leaks, or
/// copied flags cleared inside a snapshot operation), keep the data the chain never
/// touches, reopen read-write for an allocating write, and then be clean. 30 write-boundary
/// cuts per layout by default; QCOW2_CRASH_ITERATIONS=N scales that (N × 1.5).
@Suite("Reliability: crash points of snapshot/resize chains, reopened")
struct CrashSyncPointTests {
    enum Record {
        case write(offset: UInt64, data: Data)
        case sync
    }

    /// Records of the log that concern `suffix` (other files are ignored), decoded by the
    /// same parser the power-loss tests use.
    static func parseLog(_ data: Data, pathSuffix suffix: String) throws -> [Record] {
        try PowerLossTests.parseLog(data).compactMap { record in
            switch record {
            case let .write(path, offset, bytes): return path.hasSuffix(suffix) ? .write(offset: offset, data: bytes) : nil
            case let .sync(path): return path.hasSuffix(suffix) ? .sync : nil
            }
        }
    }

    static let layouts = ["lazy_refcounts=on,cluster_size=4096", "cluster_size=512", "cluster_size=65536,extended_l2=on"]

    @Test("crash points inside snapshot create/delete and resize reopen cleanly", arguments: layouts)
    func syncPoints(_ options: String) async throws {
        try #require(FileManager.default.isExecutableFile(atPath: QCOW2Binary.path), "build qcow2 first (`swift build`)")
        try await withTempDir("crash-sync") { dir in
            let image = dir + "/img.qcow2", log = dir + "/io.log"
            let size = 4 << 20
            try await qemuImg(["create", "-q", "-f", "qcow2", "-o", options, "img.qcow2", String(size)], cwd: dir)
            // Data everywhere except [0, 512k) (where the chain writes).
            var fill: [WOp] = []
            var o = 512 << 10
            var p: UInt8 = 0x20
            while o < size {
                fill.append(.write(offset: o, length: min(96 << 10, size - o), pattern: p))
                o += 96 << 10
                p &+= 1
            }
            try await qemuIO(image, fill.map(\.command), cwd: dir)
            var model = WModel(size: size, clusterSize: 512)
            for op in fill { model.apply(op) }
            try wCopy(image, dir + "/orig.qcow2")
            let chain: [[String]] = [
                ["resize", "-f", "qcow2", image, String(size + (3 << 20))],
                ["snapshot", "-c", "s1", image],
                ["io", "-f", "qcow2", "-c", "write -P 0x61 0 300k", image],
                ["snapshot", "-c", "s2", image],
                ["snapshot", "-d", "s1", image],
                ["io", "-f", "qcow2", "-c", "write -z 100k 100k", "-c", "discard 0 64k", image],
                ["snapshot", "-d", "s2", image],
                ["resize", "-f", "qcow2", "--shrink", image, String(size)],
            ]
            for args in chain {
                let r = try await run("env", ["QCOW2_IO_LOG=" + log, QCOW2Binary.path] + args, cwd: dir, timeout: 60)
                try #require(r.succeeded, "chain step failed: \(r)")
            }
            let records = try Self.parseLog(try readFile(log), pathSuffix: "/img.qcow2")
            var syncs = records.indices.filter { if case .sync = records[$0] { return true } else { return false } }.map { $0 + 1 }
            #expect(syncs.count > 5, "the chain should sync several times (\(syncs.count) syncs)")
            if syncs.count > 40 { syncs = stride(from: 0, to: syncs.count, by: syncs.count / 40 + 1).map { syncs[$0] } }
            let writeCuts = max(10, CrashTests.iterations * 3 / 2)
            let spaced = (0...writeCuts).map { records.count * $0 / writeCuts }
            let cuts = Array(Set(syncs + spaced)).sorted()
            var tolerated = 0
            var replayed = 0
            let known = [(512 << 10, size)]
            for cut in cuts {
                let replica = dir + "/cut.qcow2"
                try wCopy(dir + "/orig.qcow2", replica)
                let h = try FileHandle(forUpdating: URL(fileURLWithPath: replica))
                for case let .write(offset, data) in records[0..<cut] {
                    try h.seek(toOffset: offset)
                    try h.write(contentsOf: data)
                }
                try h.close()
                replayed += 1
                let context = "[\(options)] crash point after record \(cut)/\(records.count)"
                let dirty = crashDirtyBit(replica)
                let (bad, cautious) = try await crashCheckVerdict(replica, cwd: dir, cautiousCopiedOK: true)
                if cautious { tolerated += 1 }
                if let bad {
                    Issue.record("\(context): corrupt (dirty bit \(dirty)): \(bad)")
                    break
                }
                let bytes = try await crashRaw(replica, cwd: dir)
                if let at = crashFirstMismatch(model.bytes, bytes, in: known) {
                    Issue.record("\(context): data the chain never touched changed at \(at)")
                    break
                }
                let reopen = try await qcow2(["io", "-f", "qcow2", "-c", "write -P 0xa5 64k 8k", "-c", "read -P 0xa5 64k 8k", replica],
                                             cwd: dir, timeout: 60)
                if !wIOClean(reopen) {
                    Issue.record("\(context): read-write reopen failed: \(reopen)")
                    break
                }
                let (bad2, _) = try await crashCheckVerdict(replica, cwd: dir, cautiousCopiedOK: cautious && !dirty)
                if let bad2 {
                    Issue.record("\(context): corrupt after the read-write reopen (crashed image: dirty bit \(dirty), cleared copied flags \(cautious)): \(bad2.prefix(1500))")
                    break
                }
            }
            print("[crash] crash points [\(options)]: \(records.count) records, \(replayed) of \(cuts.count) prefixes replayed (\(syncs.count) sync points), \(tolerated) with cleared copied flags (tolerated)")
        }
    }
}
