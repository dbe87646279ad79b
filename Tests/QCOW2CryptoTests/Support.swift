import Foundation
import QCOW2Crypto
import Subprocess
import Testing

// Plumbing for the crypto tests: hex, temp dirs, running qemu tools, and a tiny
// hand-written qcow2 reader (header, FDE extension, L1/L2 lookup) so these tests depend on
// nothing but the crypto module.

// MARK: - Bytes

func hex(_ s: String) -> [UInt8] {
    var out: [UInt8] = []
    var it = s.filter { !$0.isWhitespace }.makeIterator()
    while let a = it.next(), let b = it.next() {
        out.append(UInt8(String([a, b]), radix: 16) ?? 0)
    }
    return out
}

func hexString(_ b: some Sequence<UInt8>) -> String {
    b.map { String(format: "%02x", $0) }.joined()
}

func sha256Hex(_ b: [UInt8]) throws -> String {
    hexString(try HashAlgorithm.sha256.digest(b))
}

func be32(_ b: [UInt8], _ o: Int) -> UInt32 {
    b[o..<(o + 4)].reduce(0) { $0 << 8 | UInt32($1) }
}

func be64(_ b: [UInt8], _ o: Int) -> UInt64 {
    b[o..<(o + 8)].reduce(0) { $0 << 8 | UInt64($1) }
}

func putBE32(_ b: inout [UInt8], _ o: Int, _ v: UInt32) {
    for i in 0..<4 { b[o + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * i)) }
}

// MARK: - Files

func withTempDir<T>(_ label: String, _ body: (String) async throws -> T) async throws -> T {
    let url = FileManager.default.temporaryDirectory
        .appendingPathComponent("qcow2-crypto-\(label)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    defer {
        if ProcessInfo.processInfo.environment["QCOW2_KEEP_TMP"] == nil {
            try? FileManager.default.removeItem(at: url)
        }
    }
    return try await body(url.path)
}

func readBytes(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
    let h = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    return Array(try h.read(upToCount: count) ?? Data())
}

func writeBytes(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let h = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    defer { try? h.close() }
    try h.seek(toOffset: offset)
    try h.write(contentsOf: Data(bytes))
}

// MARK: - Tools

struct ToolResult: CustomStringConvertible {
    var command: String
    var status: Int32?
    var stdout: String
    var stderr: String
    var succeeded: Bool { status == 0 }
    var description: String {
        "`\(command)` → exit \(status.map(String.init) ?? "signal")\nstdout: \(stdout.prefix(2000))\nstderr: \(stderr.prefix(2000))"
    }
}

struct ToolFailure: Error, CustomStringConvertible {
    var result: ToolResult
    var description: String { "command failed: \(result)" }
}

/// Runs `tool args` under `timeout` so a hang fails the test instead of stalling the run.
func run(_ tool: String, _ args: [String], cwd: String, timeout seconds: Int = 120) async throws -> ToolResult {
    let result = try await Subprocess.run(
        .name("timeout"),
        arguments: Arguments(["-k", "5", String(seconds), tool] + args),
        workingDirectory: .init(cwd),
        output: .string(limit: 1 << 20),
        error: .string(limit: 1 << 20)
    )
    var status: Int32?
    if case .exited(let code) = result.terminationStatus { status = code }
    return ToolResult(
        command: ([tool] + args).joined(separator: " "), status: status,
        stdout: result.standardOutput, stderr: result.standardError)
}

@discardableResult
func mustRun(_ tool: String, _ args: [String], cwd: String) async throws -> String {
    let r = try await run(tool, args, cwd: cwd)
    guard r.succeeded, !r.stdout.contains("failed") else { throw ToolFailure(result: r) }
    return r.stdout
}

/// `qemu-io` on an encrypted qcow2 image opened with `secret` (one process, all commands).
func qemuIO(_ image: String, secret: String, _ commands: [String], cwd: String) async throws -> ToolResult {
    var args = [
        "--object", "secret,id=s0,data=\(secret)", "--image-opts",
        "driver=qcow2,file.filename=\(image),encrypt.key-secret=s0",
    ]
    for c in commands { args += ["-c", c] }
    return try await run("qemu-io", args, cwd: cwd)
}

/// qemu-io that must succeed, with no failed command or pattern mismatch.
func mustQemuIO(_ image: String, secret: String, _ commands: [String], cwd: String) async throws {
    let r = try await qemuIO(image, secret: secret, commands, cwd: cwd)
    guard r.succeeded, !r.stdout.contains("failed"), !r.stderr.contains("failed") else {
        throw ToolFailure(result: r)
    }
}

/// `qemu-img create -f qcow2` with LUKS encryption and the given options.
func createLUKSImage(
    _ path: String, secret: String = "pw", options: [String] = [], size: String = "4M", cwd: String
) async throws {
    let o = (["encrypt.format=luks", "encrypt.key-secret=s0", "encrypt.iter-time=10"] + options)
        .joined(separator: ",")
    try await qemuImgRetryingCalibration(
        ["create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=\(secret)", "-o", o, path, size], cwd: cwd)
}

/// qemu-img commands that calibrate PBKDF2 (create, amend) fail with "Unable to get
/// accurate CPU usage" when a benchmark round measures 0 ms of thread CPU time with
/// getrusage(RUSAGE_THREAD). On VMs with tick-based CPU accounting this happens often for
/// fast hashes (sha1 failed 6 times in 10 here); retry those, it fails fast.
@discardableResult
func qemuImgRetryingCalibration(_ args: [String], cwd: String) async throws -> String {
    var attempt = 0
    while true {
        let r = try await run("qemu-img", args, cwd: cwd)
        if r.succeeded { return r.stdout }
        attempt += 1
        guard attempt < 30, r.stderr.contains("Unable to get accurate CPU usage") else { throw ToolFailure(result: r) }
    }
}

// MARK: - A tiny qcow2 reader

/// Just enough of qcow2 to find the encryption header and a data cluster's host offset.
struct MiniQcow2 {
    let path: String
    let header: [UInt8]
    let clusterBits: Int
    let cryptMethod: UInt32
    let l1Offset: UInt64
    let l1Size: UInt32
    /// The FDE extension (0x0537BE77): LUKS area offset and length.
    let luksArea: (offset: UInt64, length: UInt64)?

    struct Malformed: Error, CustomStringConvertible { var description: String }

    init(_ path: String) throws {
        self.path = path
        header = try readBytes(path, at: 0, count: 4096)
        guard header.count >= 104, be32(header, 0) == 0x5146_49FB else { throw Malformed(description: "not qcow2") }
        clusterBits = Int(be32(header, 20))
        cryptMethod = be32(header, 32)
        l1Size = be32(header, 36)
        l1Offset = be64(header, 40)
        let version = be32(header, 4)
        var p = version >= 3 ? Int(be32(header, 100)) : 72
        var area: (UInt64, UInt64)?
        while p + 8 <= header.count {
            let type = be32(header, p)
            let length = Int(be32(header, p + 4))
            if type == 0 { break }
            if type == 0x0537_BE77 {
                guard length == 16, p + 24 <= header.count else { throw Malformed(description: "bad FDE extension") }
                area = (be64(header, p + 8), be64(header, p + 16))
            }
            p += 8 + (length + 7) / 8 * 8
        }
        luksArea = area
    }

    var clusterSize: Int { 1 << clusterBits }

    /// Host offset of the cluster holding `guestOffset` (nil if unallocated).
    func hostClusterOffset(guest guestOffset: UInt64) throws -> UInt64? {
        let l2Bits = clusterBits - 3
        let l1Index = guestOffset >> UInt64(clusterBits + l2Bits)
        let l2Index = (guestOffset >> UInt64(clusterBits)) & ((1 << UInt64(l2Bits)) - 1)
        guard l1Index < UInt64(l1Size) else { return nil }
        let l1Entry = be64(try readBytes(path, at: l1Offset + 8 * l1Index, count: 8), 0)
        let l2Offset = l1Entry & 0x00FF_FFFF_FFFF_FE00
        guard l2Offset != 0 else { return nil }
        let l2Entry = be64(try readBytes(path, at: l2Offset + 8 * l2Index, count: 8), 0)
        let host = l2Entry & 0x00FF_FFFF_FFFF_FE00
        return host == 0 ? nil : host
    }

    /// The LUKS header parsed from the image's area.
    func luksHeader() throws -> LUKS1Header {
        guard let area = luksArea else { throw Malformed(description: "no FDE extension") }
        return try LUKS1Header(parsing: readBytes(path, at: area.offset, count: 4096), areaLength: area.length)
    }

    /// A key-material reader over the LUKS area (bounds-checked like QEMU's).
    func keyMaterialReader() throws -> LUKS1Header.KeyMaterialReader {
        guard let area = luksArea else { throw Malformed(description: "no FDE extension") }
        let path = self.path
        return { offset, length in
            guard offset + UInt64(length) <= area.length else {
                throw Malformed(description: "read outside the LUKS area")
            }
            return try readBytes(path, at: area.offset + offset, count: length)
        }
    }
}
