import Foundation
import Subprocess
import Testing

// Shared plumbing for the interop suites: temp dirs, running real tools (qemu-img,
// qemu-io, our `qcow2`) with a timeout, byte patching, and JSON comparison.
//
// Every test gets its own temporary directory (tests run in parallel in-process), and
// every external command runs under coreutils `timeout`, so a hang shows up as a test
// failure instead of stalling the run.

// MARK: - Running tools

/// What a finished command did.
struct ToolResult: Sendable, CustomStringConvertible {
    /// The command line, for messages.
    var command: String
    /// Exit code, or nil when the process died from a signal.
    var status: Int32?
    /// True when the process was terminated by a signal.
    var signaled: Bool
    var signal: Int32?
    var stdout: String
    var stderr: String
    /// The per-command time limit that was applied, in seconds.
    var timeLimit: Int

    /// coreutils `timeout` exits with 124 when the limit expired (137 if it had to SIGKILL).
    var timedOut: Bool { status == 124 || status == 137 }
    /// Termination by a signal, or an exit code that encodes one (>= 128).
    var crashed: Bool { signaled || (status ?? 0) >= 128 }
    var succeeded: Bool { status == 0 && !signaled }

    var description: String {
        let how = signaled ? "signal \(signal ?? -1)" : "exit \(status.map(String.init) ?? "?")"
        return "`\(command)` → \(how)\(timedOut ? " (TIMED OUT after \(timeLimit) s)" : "")\n"
            + "stdout: \(stdout.prefix(2000))\nstderr: \(stderr.prefix(2000))"
    }
}

/// Thrown by helpers that require a command to succeed (image preparation with qemu tools).
struct ToolFailure: Error, CustomStringConvertible {
    var result: ToolResult
    var description: String { "command failed: \(result)" }
}

/// Runs `tool` (a name looked up on PATH, or a path) with `args` in `cwd`, under
/// `timeout -k 5 <seconds>`, collecting stdout and stderr as strings.
func run(
    _ tool: String, _ args: [String], cwd: String, timeout seconds: Int = 60,
    outputLimit: Int = 64 << 20
) async throws -> ToolResult {
    let command = ([tool] + args).map(shellQuote).joined(separator: " ")
    let result = try await Subprocess.run(
        .name("timeout"),
        arguments: Arguments(["-k", "5", String(seconds), tool] + args),
        workingDirectory: .init(cwd),
        output: .string(limit: outputLimit),
        error: .string(limit: outputLimit)
    )
    var status: Int32?
    var signal: Int32?
    switch result.terminationStatus {
    case .exited(let code): status = code
    case .signaled(let sig): signal = sig
    }
    return ToolResult(
        command: command, status: status, signaled: signal != nil, signal: signal,
        stdout: result.standardOutput ?? "", stderr: result.standardError ?? "",
        timeLimit: seconds)
}

/// Runs `tool` like `run` but returns standard output as raw bytes (output that is not
/// UTF-8, such as snapshot names listed byte for byte); throws when it does not exit 0.
func runBytes(_ tool: String, _ args: [String], cwd: String, timeout seconds: Int = 60) async throws -> [UInt8] {
    let result = try await Subprocess.run(
        .name("timeout"),
        arguments: Arguments(["-k", "5", String(seconds), tool] + args),
        workingDirectory: .init(cwd),
        output: .bytes(limit: 64 << 20),
        error: .string(limit: 1 << 20)
    )
    guard case .exited(0) = result.terminationStatus else {
        throw ToolFailure(result: ToolResult(
            command: ([tool] + args).map(shellQuote).joined(separator: " "), status: nil, signaled: false, signal: nil,
            stdout: String(decoding: result.standardOutput, as: UTF8.self), stderr: result.standardError ?? "",
            timeLimit: seconds))
    }
    return result.standardOutput
}

func qemuImgBytes(_ args: [String], cwd: String) async throws -> [UInt8] {
    try await runBytes("qemu-img", args, cwd: cwd)
}

func qcow2Bytes(_ args: [String], cwd: String) async throws -> [UInt8] {
    try await runBytes(QCOW2Binary.path, args, cwd: cwd)
}

func shellQuote(_ s: String) -> String {
    if !s.isEmpty, s.allSatisfy({ $0.isLetter || $0.isNumber || "-_./=:,+@%".contains($0) }) { return s }
    return "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'"
}

/// Runs a qemu tool that must succeed (image preparation); throws with its output otherwise.
@discardableResult
func qemu(_ tool: String, _ args: [String], cwd: String, timeout: Int = 120) async throws -> String {
    let r = try await run(tool, args, cwd: cwd, timeout: timeout)
    guard r.succeeded else { throw ToolFailure(result: r) }
    return r.stdout
}

@discardableResult
func qemuImg(_ args: [String], cwd: String, timeout: Int = 120) async throws -> String {
    try await qemu("qemu-img", args, cwd: cwd, timeout: timeout)
}

/// `qemu-io -f FMT -c CMD1 -c CMD2 … FILE` (one process for all commands).
func qemuIO(_ file: String, _ commands: [String], format: String = "qcow2", cwd: String) async throws {
    guard !commands.isEmpty else { return }
    var args = ["-f", format]
    for c in commands { args += ["-c", c] }
    args.append(file)
    let r = try await run("qemu-io", args, cwd: cwd, timeout: 120)
    // qemu-io reports failed commands on stdout/stderr but may still exit 0.
    guard r.succeeded, !r.stdout.contains("failed:"), !r.stderr.contains("failed:") else {
        throw ToolFailure(result: r)
    }
}

// MARK: - Our binary

enum QCOW2Binary {
    /// `$QCOW2_BIN`, else `<package root>/.build/debug/qcow2` (root found from #filePath).
    static let path: String = {
        if let p = ProcessInfo.processInfo.environment["QCOW2_BIN"], !p.isEmpty { return p }
        return packageRoot + "/.build/debug/qcow2"
    }()

    static let packageRoot: String = {
        // <root>/Tests/QCOW2Tests/Support/Tools.swift
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<4 { url.deleteLastPathComponent() }
        return url.path
    }()
}

/// Runs our `qcow2` CLI.
func qcow2(_ args: [String], cwd: String, timeout: Int = 60) async throws -> ToolResult {
    try #require(
        FileManager.default.isExecutableFile(atPath: QCOW2Binary.path),
        "qcow2 binary not found at \(QCOW2Binary.path); run `swift build` or set QCOW2_BIN")
    return try await run(QCOW2Binary.path, args, cwd: cwd, timeout: timeout)
}

// MARK: - Expectations on results

/// Never a crash, never a hang.
func expectSane(_ r: ToolResult, sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(!r.timedOut, "hang: \(r)", sourceLocation: sourceLocation)
    #expect(!r.crashed, "crash: \(r)", sourceLocation: sourceLocation)
}

/// Exit 0 (and no crash / hang).
func expectSuccess(_ r: ToolResult, sourceLocation: SourceLocation = #_sourceLocation) {
    expectSane(r, sourceLocation: sourceLocation)
    #expect(r.succeeded, "expected success: \(r)", sourceLocation: sourceLocation)
}

/// The error contract: exit code `code` (1 by default) and exactly one non-empty line on stderr.
func expectCleanFailure(
    _ r: ToolResult, code: Int32 = 1, mentioning: String? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    expectSane(r, sourceLocation: sourceLocation)
    #expect(r.status == code, "expected exit \(code): \(r)", sourceLocation: sourceLocation)
    #expect(isOneLineMessage(r.stderr), "expected a one-line error on stderr: \(r)", sourceLocation: sourceLocation)
    if let mentioning {
        #expect(
            r.stderr.lowercased().contains(mentioning.lowercased()),
            "error message should mention \"\(mentioning)\": \(r)", sourceLocation: sourceLocation)
    }
}

func isOneLineMessage(_ s: String) -> Bool {
    let t = s.trimmingCharacters(in: .whitespacesAndNewlines)
    return !t.isEmpty && !t.contains("\n")
}

// MARK: - Temp dirs and files

/// Creates a fresh directory, runs `body` with its path, and removes it afterwards
/// (set QCOW2_KEEP_TMP=1 to keep it for debugging).
func withTempDir<T>(_ label: String = "t", _ body: (String) async throws -> T) async throws -> T {
    let safe = String(label.map { $0.isLetter || $0.isNumber ? $0 : "-" }.prefix(40))
    let url = FileManager.default.temporaryDirectory
        .appendingPathComponent("qcow2-tests-\(safe)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    defer {
        if ProcessInfo.processInfo.environment["QCOW2_KEEP_TMP"] == nil {
            try? FileManager.default.removeItem(at: url)
        }
    }
    return try await body(url.path)
}

func mkdir(_ path: String) throws {
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
}

func writeFile(_ path: String, _ data: Data) throws {
    try data.write(to: URL(fileURLWithPath: path))
}

func readFile(_ path: String) throws -> Data {
    try Data(contentsOf: URL(fileURLWithPath: path))
}

func fileSize(_ path: String) throws -> UInt64 {
    let attrs = try FileManager.default.attributesOfItem(atPath: path)
    return (attrs[.size] as? NSNumber)?.uint64Value ?? 0
}

/// Overwrites bytes in place (like pwrite).
func patch(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    try h.write(contentsOf: Data(bytes))
}

func patchBE32(_ path: String, at offset: UInt64, _ value: UInt32) throws {
    try patch(path, at: offset, withUnsafeBytes(of: value.bigEndian) { Array($0) })
}

func patchBE64(_ path: String, at offset: UInt64, _ value: UInt64) throws {
    try patch(path, at: offset, withUnsafeBytes(of: value.bigEndian) { Array($0) })
}

func readBytes(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
    let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    return Array(try h.read(upToCount: count) ?? Data())
}

func readBE32(_ path: String, at offset: UInt64) throws -> UInt32 {
    try readBytes(path, at: offset, count: 4).reduce(0) { $0 << 8 | UInt32($1) }
}

func readBE64(_ path: String, at offset: UInt64) throws -> UInt64 {
    try readBytes(path, at: offset, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
}

func truncateFile(_ path: String, to size: UInt64) throws {
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.truncate(atOffset: size)
}

/// Byte comparison of two files: nil when identical, else a description of the first difference.
func fileDifference(_ a: String, _ b: String) throws -> String? {
    let da = try readFile(a), db = try readFile(b)
    if da == db { return nil }
    let n = min(da.count, db.count)
    let ba = [UInt8](da), bb = [UInt8](db)
    let first = (0..<n).first { ba[$0] != bb[$0] }
    if let first {
        return "sizes \(da.count) vs \(db.count); first difference at byte \(first) (0x\(String(first, radix: 16))): "
            + "\(String(format: "%02x", da[first])) vs \(String(format: "%02x", db[first]))"
    }
    return "sizes differ: \(da.count) vs \(db.count) (common prefix identical)"
}

// MARK: - Deterministic test data

/// Deterministic data that compresses to streams of varying length: per 4 KiB block,
/// zeros, a constant byte, low-entropy text, or incompressible noise.
func mixedData(size: Int, seed: UInt64) -> Data {
    var state = seed &* 0x9E37_79B9_7F4A_7C15 | 1
    func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
    var out = [UInt8](repeating: 0, count: size)
    var pos = 0
    while pos < size {
        let end = min(pos + 4096, size)
        switch next() % 4 {
        case 0: break
        case 1:
            let b = UInt8(truncatingIfNeeded: next() | 1)
            for i in pos..<end { out[i] = b }
        case 2:
            for i in pos..<end { out[i] = 0x61 + UInt8(next() % 12) }
        default:
            var i = pos
            while i < end {
                var v = next()
                for _ in 0..<8 where i < end {
                    out[i] = UInt8(truncatingIfNeeded: v)
                    v >>= 8
                    i += 1
                }
            }
        }
        pos = end
    }
    return Data(out)
}

// MARK: - JSON

func parseJSON(_ text: String, _ what: String) throws -> Any {
    do {
        return try JSONSerialization.jsonObject(with: Data(text.utf8), options: [.fragmentsAllowed])
    } catch {
        throw JSONFailure(description: "\(what) printed invalid JSON (\(error)):\n\(text.prefix(2000))")
    }
}

struct JSONFailure: Error, CustomStringConvertible { var description: String }

/// Canonical text of a JSON value (sorted keys), for equality and messages.
func canonicalJSON(_ value: Any) -> String {
    guard let d = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .fragmentsAllowed]) else {
        return "\(value)"
    }
    return String(decoding: d, as: UTF8.self)
}

/// Top-level `info` keys of the contract: when qemu-img prints one, ours must too.
let requiredInfoKeys = [
    "virtual-size", "filename", "cluster-size", "format", "actual-size", "dirty-flag",
    "backing-filename", "full-backing-filename", "backing-filename-format", "format-specific",
]
/// `format-specific.data` keys of the contract.
let requiredFormatSpecificKeys = [
    "compat", "lazy-refcounts", "refcount-bits", "corrupt", "extended-l2", "compression-type",
    "data-file", "data-file-raw",
]

/// Compares one image's `info --output=json` object: every key printed by both must have
/// the same value; `format-specific.data` likewise; contract keys qemu prints must be present.
func compareInfoObject(
    ours: Any, qemu: Any, context: String, sourceLocation: SourceLocation = #_sourceLocation
) {
    guard let o = ours as? [String: Any], let q = qemu as? [String: Any] else {
        Issue.record("\(context): info JSON is not an object: ours \(canonicalJSON(ours)) / qemu \(canonicalJSON(qemu))",
                     sourceLocation: sourceLocation)
        return
    }
    for key in requiredInfoKeys where q[key] != nil {
        #expect(o[key] != nil, "\(context): our info lacks key \"\(key)\" (qemu-img: \(canonicalJSON(q[key]!)))",
                sourceLocation: sourceLocation)
    }
    for (key, qv) in q where key != "format-specific" {
        guard let ov = o[key] else { continue }
        #expect(canonicalJSON(ov) == canonicalJSON(qv),
                "\(context): info \"\(key)\": ours \(canonicalJSON(ov)) vs qemu-img \(canonicalJSON(qv))",
                sourceLocation: sourceLocation)
    }
    if let qfs = q["format-specific"] as? [String: Any], let ofs = o["format-specific"] as? [String: Any] {
        if let qt = qfs["type"], let ot = ofs["type"] {
            #expect(canonicalJSON(ot) == canonicalJSON(qt), "\(context): format-specific.type: ours \(canonicalJSON(ot)) vs \(canonicalJSON(qt))",
                    sourceLocation: sourceLocation)
        }
        if let qd = qfs["data"] as? [String: Any] {
            guard let od = ofs["data"] as? [String: Any] else {
                Issue.record("\(context): our format-specific has no data object: \(canonicalJSON(ofs))", sourceLocation: sourceLocation)
                return
            }
            for key in requiredFormatSpecificKeys where qd[key] != nil {
                #expect(od[key] != nil, "\(context): our format-specific.data lacks \"\(key)\" (qemu-img: \(canonicalJSON(qd[key]!)))",
                        sourceLocation: sourceLocation)
            }
            for (key, qv) in qd {
                guard let ov = od[key] else { continue }
                #expect(canonicalJSON(ov) == canonicalJSON(qv),
                        "\(context): format-specific.data \"\(key)\": ours \(canonicalJSON(ov)) vs qemu-img \(canonicalJSON(qv))",
                        sourceLocation: sourceLocation)
            }
        }
    }
}

/// Compares `info --output=json` outputs; with `chain`, both must be arrays of equal length.
func compareInfo(ours: String, qemu: String, chain: Bool, context: String,
                 sourceLocation: SourceLocation = #_sourceLocation) throws {
    let o = try parseJSON(ours, "qcow2 info")
    let q = try parseJSON(qemu, "qemu-img info")
    if chain {
        guard let oa = o as? [Any], let qa = q as? [Any] else {
            Issue.record("\(context): --backing-chain output must be a JSON array; ours: \(ours.prefix(300))", sourceLocation: sourceLocation)
            return
        }
        #expect(oa.count == qa.count, "\(context): backing chain length: ours \(oa.count) vs qemu-img \(qa.count)",
                sourceLocation: sourceLocation)
        for (i, (ov, qv)) in zip(oa, qa).enumerated() {
            compareInfoObject(ours: ov, qemu: qv, context: "\(context) [chain element \(i)]", sourceLocation: sourceLocation)
        }
    } else {
        compareInfoObject(ours: o, qemu: q, context: context, sourceLocation: sourceLocation)
    }
}

/// Compares `map --output=json` outputs: same extents, and every key printed by both agrees.
func compareMap(ours: String, qemu: String, context: String,
                sourceLocation: SourceLocation = #_sourceLocation) throws {
    guard let oa = try parseJSON(ours, "qcow2 map") as? [[String: Any]] else {
        Issue.record("\(context): our map output is not an array of objects: \(ours.prefix(500))", sourceLocation: sourceLocation)
        return
    }
    let qa = try #require(try parseJSON(qemu, "qemu-img map") as? [[String: Any]])
    let brief = { (a: [[String: Any]]) in a.prefix(60).map(canonicalJSON).joined(separator: "\n") }
    guard oa.count == qa.count else {
        Issue.record("\(context): map has \(oa.count) extents, qemu-img \(qa.count)\nours:\n\(brief(oa))\nqemu-img:\n\(brief(qa))",
                     sourceLocation: sourceLocation)
        return
    }
    var mismatches: [String] = []
    for (i, (o, q)) in zip(oa, qa).enumerated() {
        for key in ["start", "length"] where o[key] == nil {
            mismatches.append("extent \(i): our extent lacks \"\(key)\"")
        }
        for (key, qv) in q {
            guard let ov = o[key] else { continue }
            if canonicalJSON(ov) != canonicalJSON(qv) {
                mismatches.append("extent \(i) \"\(key)\": ours \(canonicalJSON(ov)) vs qemu-img \(canonicalJSON(qv))")
            }
        }
        if q["offset"] != nil && o["offset"] == nil {
            mismatches.append("extent \(i): ours lacks \"offset\" (qemu-img \(canonicalJSON(q["offset"]!)))")
        }
        if q["offset"] == nil, let ov = o["offset"] {
            mismatches.append("extent \(i): ours prints \"offset\" \(canonicalJSON(ov)), qemu-img prints none")
        }
    }
    if !mismatches.isEmpty {
        Issue.record("\(context): map mismatch:\n\(mismatches.prefix(20).joined(separator: "\n"))\nours:\n\(brief(oa))\nqemu-img:\n\(brief(qa))",
                     sourceLocation: sourceLocation)
    }
}
