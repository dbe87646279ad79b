import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Helpers for the write-side suites (Write*.swift): a seeded PRNG, a byte-level model of
// what an image must read back as, qemu-io / qemu-img check / map wrappers that return
// results instead of throwing, and a normalised map comparison that ignores host offsets.
//
// The judges are always the real qemu tools or the model below; nothing here encodes the
// expected output of our own tool.

// MARK: - Deterministic randomness

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for test generation.
struct WSplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in 0..<bound (bound > 0).
    mutating func below(_ bound: Int) -> Int { Int(next() % UInt64(bound)) }
    mutating func chance(_ percent: Int) -> Bool { below(100) < percent }
}

/// How many random sequences each property variant runs: `QCOW2_PROPERTY_ITERATIONS`
/// (for long soak runs), else `defaultCount` (kept small so CI stays fast).
func wPropertyIterations(default defaultCount: Int) -> Int {
    if let s = ProcessInfo.processInfo.environment["QCOW2_PROPERTY_ITERATIONS"], let n = Int(s), n > 0 { return n }
    return defaultCount
}

/// Deterministic bytes with long zero runs and repeated-byte runs as well as noise (for
/// convert round trips: exercises holes, zero detection and compression).
func wRoundTripData(size: Int, seed: UInt64) -> Data {
    var rng = WSplitMix64(seed: seed)
    var out = [UInt8](mixedData(size: size, seed: seed))
    // Punch a few long zero regions (several clusters) and a few long constant regions.
    for _ in 0..<max(1, size >> 20) {
        let len = min(size, 65536 * (1 + rng.below(6)) + rng.below(4096))
        let start = rng.below(max(1, size - len))
        let byte: UInt8 = rng.chance(70) ? 0 : UInt8(truncatingIfNeeded: rng.next() | 1)
        for i in start..<min(size, start + len) { out[i] = byte }
    }
    return Data(out)
}

// MARK: - Operations and the model

/// One qemu-io style command, in the subset both `qemu-io` and `qcow2 io` accept.
enum WOp: Sendable, CustomStringConvertible {
    case write(offset: Int, length: Int, pattern: UInt8)
    /// `write -c`: whole clusters only (cluster-aligned offset; QEMU also refuses to
    /// compress into an allocated cluster).
    case compressed(offset: Int, length: Int, pattern: UInt8)
    case zero(offset: Int, length: Int, unmap: Bool)
    case discard(offset: Int, length: Int)
    case flush

    /// The command string, as for `qemu-io -c`.
    var command: String {
        switch self {
        case let .write(o, l, p): return "write -P 0x\(String(p, radix: 16)) \(o) \(l)"
        case let .compressed(o, l, p): return "write -c -P 0x\(String(p, radix: 16)) \(o) \(l)"
        case let .zero(o, l, u): return "write -z\(u ? " -u" : "") \(o) \(l)"
        case let .discard(o, l): return "discard \(o) \(l)"
        case .flush: return "flush"
        }
    }
    var description: String { command }
}

/// What a qcow2 image must read back as, kept as plain bytes. Semantics follow QEMU 7.2:
/// a write stores the pattern; a zero write stores zeros; a discard only affects whole
/// clusters inside the range (QEMU ignores partial clusters, except a partial last cluster
/// that reaches the end of the disk), and such a cluster then reads as zeros — except on a
/// v2 (compat=0.10) image with a backing file, where QEMU refuses discards altogether
/// (qcow2_co_pdiscard returns -ENOTSUP: v2 has no zero flag, so discarding would expose
/// stale backing data) and the data stays.
struct WModel {
    var bytes: [UInt8]
    let clusterSize: Int
    let v3: Bool
    /// The backing chain's content (padded/truncated to the virtual size), or nil.
    let backing: [UInt8]?

    init(size: Int, clusterSize: Int, v3: Bool = true, backing: [UInt8]? = nil) {
        self.clusterSize = clusterSize
        self.v3 = v3
        if var b = backing {
            if b.count < size { b += [UInt8](repeating: 0, count: size - b.count) }
            if b.count > size { b.removeLast(b.count - size) }
            self.backing = b
            bytes = b
        } else {
            self.backing = nil
            bytes = [UInt8](repeating: 0, count: size)
        }
    }

    var size: Int { bytes.count }

    mutating func apply(_ op: WOp) {
        switch op {
        case let .write(o, l, p), let .compressed(o, l, p):
            fill(o, l, p)
        case let .zero(o, l, _):
            fill(o, l, 0)
        case let .discard(o, l):
            // Every cluster whose whole extent (the last one may be short) lies inside the range.
            if !v3 && backing != nil { break }
            let c = clusterSize
            var k = (o + c - 1) / c
            while k * c < size {
                let start = k * c, end = min(start + c, size)
                guard end <= o + l else { break }
                fill(start, end - start, 0)
                k += 1
            }
        case .flush:
            break
        }
    }

    private mutating func fill(_ offset: Int, _ length: Int, _ byte: UInt8) {
        bytes.withUnsafeMutableBufferPointer { p in
            UnsafeMutableBufferPointer(rebasing: p[offset..<(offset + length)]).initialize(repeating: byte)
        }
    }

    func write(to path: String) throws { try writeFile(path, Data(bytes)) }

    /// Maximal runs of one byte value, as (offset, length, byte).
    func uniformRun(at offset: Int, maxLength: Int) -> (Int, Int, UInt8) {
        let b = bytes[offset]
        var end = offset + 1
        while end < bytes.count, end - offset < maxLength, bytes[end] == b { end += 1 }
        return (offset, end - offset, b)
    }

    /// `read -P` commands over random uniform runs, checking the model's content.
    func readChecks(count: Int, rng: inout WSplitMix64) -> [String] {
        (0..<count).map { _ in
            let (o, l, b) = uniformRun(at: rng.below(bytes.count), maxLength: 1 + rng.below(3 * clusterSize))
            return "read -P 0x\(String(b, radix: 16)) \(o) \(l)"
        }
    }
}

/// `read -P` commands for every maximal uniform run of `data` (merged up to `limit` runs,
/// chosen evenly), so a reader can be checked against content produced by another tool.
func wReadChecks(for data: [UInt8], limit: Int = 200, minRun: Int = 1) -> [String] {
    var runs: [(Int, Int, UInt8)] = []
    var i = 0
    while i < data.count {
        var j = i + 1
        while j < data.count, data[j] == data[i] { j += 1 }
        if j - i >= minRun { runs.append((i, j - i, data[i])) }
        i = j
    }
    if runs.count > limit {
        let step = Double(runs.count) / Double(limit)
        runs = (0..<limit).map { runs[Int(Double($0) * step)] }
    }
    return runs.map { "read -P 0x\(String($0.2, radix: 16)) \($0.0) \($0.1)" }
}

// MARK: - Running qemu-io / our io, without throwing

/// `qemu-io -f FMT [-r] -c … FILE` with the result returned (not thrown).
func wQemuIO(_ file: String, _ commands: [String], format: String = "qcow2", readOnly: Bool = false,
             cwd: String, timeout: Int = 120) async throws -> ToolResult {
    var args = ["-f", format]
    if readOnly { args.append("-r") }
    for c in commands { args += ["-c", c] }
    args.append(file)
    return try await run("qemu-io", args, cwd: cwd, timeout: timeout)
}

/// True when a qemu-io / qcow2 io run reported no failed command.
func wIOClean(_ r: ToolResult) -> Bool {
    r.succeeded && !r.stdout.contains("failed") && !r.stderr.contains("failed")
}

/// `qcow2 io -f FMT [-r] -c … FILE`.
func wOurIO(_ file: String, _ commands: [String], format: String? = "qcow2", readOnly: Bool = false,
            cwd: String, timeout: Int = 120) async throws -> ToolResult {
    var args = ["io"]
    if let format { args += ["-f", format] }
    if readOnly { args.append("-r") }
    for c in commands { args += ["-c", c] }
    args.append(file)
    return try await qcow2(args, cwd: cwd, timeout: timeout)
}

/// Runs `commands` through our `qcow2 io` in batches of `batch` commands per process (each
/// process reopens the image); expects every process to succeed.
func wOurIOBatched(_ file: String, _ commands: [String], batch: Int, cwd: String, context: String,
                   sourceLocation: SourceLocation = #_sourceLocation) async throws -> Bool {
    var i = 0
    while i < commands.count {
        let chunk = Array(commands[i..<min(commands.count, i + batch)])
        let r = try await wOurIO(file, chunk, cwd: cwd)
        expectSane(r, sourceLocation: sourceLocation)
        guard wIOClean(r) else {
            Issue.record("\(context): `qcow2 io` batch starting at command \(i) failed: \(r)", sourceLocation: sourceLocation)
            return false
        }
        i += batch
    }
    return true
}

// MARK: - qemu-img judges

/// `qemu-img check --output=json IMAGE` must exit 0 and report no corruptions, leaks or
/// check errors. Returns the parsed report (nil when it could not be obtained).
@discardableResult
func wExpectCleanCheck(_ image: String, format: String = "qcow2", cwd: String, context: String,
                       sourceLocation: SourceLocation = #_sourceLocation) async throws -> [String: Any]? {
    let r = try await run("qemu-img", ["check", "-f", format, "--output=json", image], cwd: cwd, timeout: 120)
    #expect(r.status == 0, "\(context): `qemu-img check` of \(image) is not clean: \(r)", sourceLocation: sourceLocation)
    guard let obj = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] else {
        Issue.record("\(context): `qemu-img check` printed no JSON: \(r)", sourceLocation: sourceLocation)
        return nil
    }
    for key in ["corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed"] {
        let v = (obj[key] as? NSNumber)?.intValue ?? 0
        #expect(v == 0, "\(context): `qemu-img check` of \(image) reports \(key) = \(v): \(r.stdout)", sourceLocation: sourceLocation)
    }
    return obj
}

/// `qemu-img compare -f FA -F FB A B`: expects exit 0 (identical).
func wExpectIdentical(_ a: String, _ b: String, formatA: String = "qcow2", formatB: String = "qcow2",
                      cwd: String, context: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let r = try await run("qemu-img", ["compare", "-f", formatA, "-F", formatB, a, b], cwd: cwd, timeout: 120)
    #expect(r.status == 0, "\(context): `qemu-img compare` says \(a) and \(b) differ: \(r)", sourceLocation: sourceLocation)
}

/// One extent of `qemu-img map --output=json`, without the host offset.
struct WMapExtent: Equatable, CustomStringConvertible {
    var start: Int, length: Int, depth: Int, present: Bool, zero: Bool, data: Bool
    var description: String {
        "{start \(start), length \(length), depth \(depth), present \(present), zero \(zero), data \(data)}"
    }
}

/// Parses map JSON, drops offsets and merges adjacent extents that agree on
/// depth/present/zero/data (qemu-img only splits them because host offsets differ).
func wNormalizedMap(_ json: String) throws -> [WMapExtent] {
    let arr = try #require(try parseJSON(json, "map") as? [[String: Any]])
    var out: [WMapExtent] = []
    for e in arr {
        let ext = WMapExtent(
            start: (e["start"] as? NSNumber)?.intValue ?? -1, length: (e["length"] as? NSNumber)?.intValue ?? -1,
            depth: (e["depth"] as? NSNumber)?.intValue ?? -1, present: (e["present"] as? Bool) ?? false,
            zero: (e["zero"] as? Bool) ?? false, data: (e["data"] as? Bool) ?? false)
        if var last = out.last, last.start + last.length == ext.start, last.depth == ext.depth,
           last.present == ext.present, last.zero == ext.zero, last.data == ext.data {
            last.length += ext.length
            out[out.count - 1] = last
        } else {
            out.append(ext)
        }
    }
    return out
}

/// `qemu-img map --output=json` of two images agree on start/length/depth/present/zero/data.
func wExpectSameMap(_ a: String, _ b: String, cwd: String, context: String,
                    sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let ma = try wNormalizedMap(try await qemuImg(["map", "--output=json", a], cwd: cwd))
    let mb = try wNormalizedMap(try await qemuImg(["map", "--output=json", b], cwd: cwd))
    if ma != mb {
        let firstDiff = zip(ma, mb).enumerated().first { $0.element.0 != $0.element.1 }
        let where_ = firstDiff.map { "first difference at extent \($0.offset): \($0.element.0) vs \($0.element.1)" }
            ?? "extent counts \(ma.count) vs \(mb.count)"
        Issue.record("""
            \(context): qemu-img map differs (\(where_))
            \(a):
            \(ma.prefix(40).map(\.description).joined(separator: "\n"))
            \(b):
            \(mb.prefix(40).map(\.description).joined(separator: "\n"))
            """, sourceLocation: sourceLocation)
    }
}

/// `qemu-img convert -O raw` of an image, read back as bytes (needs a scratch path).
func wQemuRawBytes(_ image: String, format: String = "qcow2", scratch: String, cwd: String) async throws -> [UInt8] {
    try await qemuImg(["convert", "-f", format, "-O", "raw", image, scratch], cwd: cwd)
    defer { try? FileManager.default.removeItem(atPath: scratch) }
    return [UInt8](try readFile(scratch))
}

/// Copies a file byte for byte (sparse-agnostic).
func wCopy(_ from: String, _ to: String) throws {
    try? FileManager.default.removeItem(atPath: to)
    try FileManager.default.copyItem(atPath: from, toPath: to)
}

// MARK: - Holding an image open in qemu-io

