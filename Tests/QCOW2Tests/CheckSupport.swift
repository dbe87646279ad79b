import Foundation
import Testing

// Helpers for the check/repair suites (Check*.swift): locating metadata in images made by
// qemu-img/qemu-io so that tests can corrupt them byte by byte, and running both
// `qemu-img check` and `qcow2 check` on the same file. The judge is always qemu-img.

/// Reads header fields and locates tables of a qcow2 file (values as stored on disk).
struct CkImage: Sendable {
    let path: String

    static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    static let copied: UInt64 = 1 << 63

    func u64(_ at: UInt64) throws -> UInt64 { try readBE64(path, at: at) }
    func u32(_ at: UInt64) throws -> UInt32 { try readBE32(path, at: at) }
    func set64(_ at: UInt64, _ v: UInt64) throws { try patchBE64(path, at: at, v) }
    func set32(_ at: UInt64, _ v: UInt32) throws { try patchBE32(path, at: at, v) }
    func set16(_ at: UInt64, _ v: UInt16) throws { try patch(path, at: at, [UInt8(v >> 8), UInt8(v & 0xFF)]) }

    var clusterSize: UInt64 { get throws { 1 << UInt64(try u32(20)) } }
    var l1Table: UInt64 { get throws { try u64(40) } }
    var reftable: UInt64 { get throws { try u64(48) } }
    var snapshotTable: UInt64 { get throws { try u64(64) } }

    /// Offset of active L1 entry `i`.
    func l1Entry(_ i: UInt64) throws -> UInt64 { try l1Table + 8 * i }
    /// Host offset of the L2 table of active L1 entry `i`.
    func l2Table(_ i: UInt64 = 0) throws -> UInt64 { try u64(try l1Entry(i)) & Self.offsetMask }
    /// Offset of entry `j` of the L2 table of active L1 entry `i` (`entrySize` 16 with
    /// extended L2).
    func l2Entry(_ j: UInt64, l1 i: UInt64 = 0, entrySize: UInt64 = 8) throws -> UInt64 {
        try l2Table(i) + entrySize * j
    }
    /// Offset of the 16-bit refcount of `cluster` (first refcount block only).
    func refcount16(_ cluster: UInt64) throws -> UInt64 {
        (try u64(try reftable) & ~0x1FF) + 2 * cluster
    }
}

/// Runs `qemu-img check ARGS IMAGE` (any exit code).
func ckQemuCheck(_ args: [String], _ image: String, cwd: String) async throws -> ToolResult {
    try await run("qemu-img", ["check"] + args + [image], cwd: cwd, timeout: 120)
}

/// Runs `qcow2 check ARGS IMAGE` (any exit code).
func ckOurCheck(_ args: [String], _ image: String, cwd: String) async throws -> ToolResult {
    try await qcow2(["check"] + args + [image], cwd: cwd, timeout: 120)
}

/// qemu-img's messages start with "qemu-img: " where ours start with "qcow2: ".
func ckNormalizedStderr(_ s: String) -> String {
    s.split(separator: "\n", omittingEmptySubsequences: false)
        .map { $0.hasPrefix("qemu-img: ") ? "qcow2: " + $0.dropFirst("qemu-img: ".count) : String($0) }
        .joined(separator: "\n")
}

/// The counts of a `check --output=json` report (absent members are 0).
struct CkCounts: Equatable, CustomStringConvertible {
    var values: [String: Int64]

    static let keys = [
        "check-errors", "corruptions", "leaks", "corruptions-fixed", "leaks-fixed", "image-end-offset",
        "total-clusters", "allocated-clusters", "fragmented-clusters", "compressed-clusters",
    ]

    init?(json: String) {
        guard let data = json.data(using: .utf8),
              let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return nil }
        var v: [String: Int64] = [:]
        for k in Self.keys { v[k] = (obj[k] as? NSNumber)?.int64Value ?? 0 }
        values = v
    }

    subscript(_ key: String) -> Int64 { values[key] ?? 0 }
    var description: String { Self.keys.map { "\($0)=\(self[$0])" }.joined(separator: " ") }
}

func ckCopy(_ from: String, _ to: String) throws {
    try? FileManager.default.removeItem(atPath: to)
    try FileManager.default.copyItem(atPath: from, toPath: to)
}
