import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Helpers for the image-management suites (Ops*.swift): snapshot, resize, rebase, commit,
// measure, amend, preallocated create, lazy-refcount crash recovery and bench.
//
// The pattern throughout: build a scenario once (with the qemu tools) in `ours/`, copy it
// to `qemu/` under the same file names (so relative backing names and every header byte
// agree), run our `qcow2 CMD` in `ours/` and `qemu-img CMD` in `qemu/`, then judge our
// result against qemu-img's (bytes, `qemu-img info`/`map`/`check`/`compare`). Nothing here
// encodes the expected output of our own tool.

// MARK: - Twin directories

/// One scenario in two directories with identical file names: `ours` (operated on by our
/// `qcow2`) and `qemu` (operated on by `qemu-img`).
struct OpsTwin: Sendable {
    let root: String
    var ours: String { root + "/ours" }
    var qemu: String { root + "/qemu" }
    /// Builds images in `ours` (mirror them to `qemu` with `mirror()`).
    var builder: ImageBuilder { ImageBuilder(dir: ours) }

    init(root: String) throws {
        self.root = root
        try mkdir(root + "/ours")
        try mkdir(root + "/qemu")
    }

    func o(_ name: String) -> String { ours + "/" + name }
    func q(_ name: String) -> String { qemu + "/" + name }

    /// Replaces the whole `qemu` directory by a copy of `ours` that has the same holes:
    /// QEMU's block status (map, measure, rebase, commit) looks at host-file holes, so both
    /// copies must have the same allocation, not just the same bytes.
    func mirror() throws {
        try? FileManager.default.removeItem(atPath: qemu)
        try opsCopyTree(ours, qemu)
    }

    /// Copies one file from `ours` to `qemu` (same name), with the same holes.
    func mirror(_ name: String) throws { try opsCopyPreservingHoles(o(name), q(name)) }

    /// Runs `qcow2 ARGS` in `ours` and `qemu-img ARGS` (or `qemuArgs`) in `qemu`.
    func both(_ args: [String], qemuArgs: [String]? = nil, timeout: Int = 120) async throws -> (ours: ToolResult, qemu: ToolResult) {
        let r = try await qcow2(args, cwd: ours, timeout: timeout)
        let q = try await run("qemu-img", qemuArgs ?? args, cwd: qemu, timeout: timeout)
        return (r, q)
    }

    /// `qemu-io -c …` on the same file in both directories (qemu-io is the writer for both,
    /// so the two images only differ by what the commands under test did).
    func qemuIOBoth(_ file: String, _ commands: [String], format: String = "qcow2") async throws {
        try await qemuIO(file, commands, format: format, cwd: ours)
        try await qemuIO(file, commands, format: format, cwd: qemu)
    }
}

/// Copies a file so that the copy has data exactly where the source has data and holes
/// exactly where it has holes (SEEK_DATA/SEEK_HOLE; `cp` and FileManager either fill holes
/// or punch new ones into zero blocks, which changes what `qemu-img map` reports).
func opsCopyPreservingHoles(_ from: String, _ to: String) throws {
    let src = open(from, O_RDONLY)
    guard src >= 0 else { throw JSONFailure(description: "open \(from): errno \(errno)") }
    defer { close(src) }
    try? FileManager.default.removeItem(atPath: to)
    let dst = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard dst >= 0 else { throw JSONFailure(description: "open \(to): errno \(errno)") }
    defer { close(dst) }
    var st = stat()
    guard fstat(src, &st) == 0 else { throw JSONFailure(description: "fstat \(from): errno \(errno)") }
    let size = off_t(st.st_size)
    guard ftruncate(dst, size) == 0 else { throw JSONFailure(description: "ftruncate \(to): errno \(errno)") }
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    var offset: off_t = 0
    while offset < size {
        let data = lseek(src, offset, 3 /* SEEK_DATA */)
        if data < 0 { break } // ENXIO: only a hole remains
        var end = lseek(src, data, 4 /* SEEK_HOLE */)
        if end < 0 { end = size }
        var pos = data
        while pos < end {
            let n = try buffer.withUnsafeMutableBytes { p -> Int in
                let r = pread(src, p.baseAddress, min(p.count, Int(end - pos)), pos)
                guard r > 0 else { throw JSONFailure(description: "pread \(from): errno \(errno)") }
                guard pwrite(dst, p.baseAddress, r, pos) == r else { throw JSONFailure(description: "pwrite \(to): errno \(errno)") }
                return r
            }
            pos += off_t(n)
        }
        offset = end
    }
}

/// Copies a directory tree (directories and regular files, holes preserved).
func opsCopyTree(_ from: String, _ to: String) throws {
    try mkdir(to)
    for name in try FileManager.default.contentsOfDirectory(atPath: from) {
        var isDir: ObjCBool = false
        let f = from + "/" + name, t = to + "/" + name
        guard FileManager.default.fileExists(atPath: f, isDirectory: &isDir) else { continue }
        if isDir.boolValue { try opsCopyTree(f, t) } else { try opsCopyPreservingHoles(f, t) }
    }
}

/// Runs `body` with a fresh twin in a fresh temp dir.
func withTwin<T>(_ label: String, _ body: (OpsTwin) async throws -> T) async throws -> T {
    try await withTempDir("ops-" + label) { dir in try await body(try OpsTwin(root: dir)) }
}

/// Both tools must have ended the same way (exit code), with neither crashing nor hanging.
func opsExpectSameStatus(_ r: (ours: ToolResult, qemu: ToolResult), context: String,
                         sourceLocation: SourceLocation = #_sourceLocation) {
    expectSane(r.ours, sourceLocation: sourceLocation)
    #expect(!r.qemu.crashed && !r.qemu.timedOut, "\(context): qemu-img misbehaved: \(r.qemu)", sourceLocation: sourceLocation)
    #expect(r.ours.status == r.qemu.status,
            "\(context): exit code: ours \(r.ours.status.map(String.init) ?? "signal") vs qemu-img \(r.qemu.status.map(String.init) ?? "signal")\nours: \(r.ours)\nqemu-img: \(r.qemu)",
            sourceLocation: sourceLocation)
}

// MARK: - Byte comparison with snapshot dates masked

/// The bytes of a qcow2 file with every snapshot table entry's date_sec/date_nsec (entry
/// bytes 16..<24) zeroed, so images made at different times by our tool and by qemu-img can
/// be compared byte for byte. Entries: 40 fixed bytes, extra data (size at +36), id
/// (length at +12), name (length at +14), padded to 8.
func opsMaskedImageBytes(_ path: String) throws -> [UInt8] {
    var d = [UInt8](try readFile(path))
    func be(_ off: Int, _ n: Int) -> Int? {
        guard off >= 0, off + n <= d.count else { return nil }
        return d[off..<(off + n)].reduce(0) { $0 << 8 | Int($1) }
    }
    guard let count = be(60, 4), var off = be(64, 8), count > 0 else { return d }
    for _ in 0..<count {
        guard let idLen = be(off + 12, 2), let nameLen = be(off + 14, 2), let extra = be(off + 36, 4),
              off + 24 <= d.count else { break }
        for i in (off + 16)..<(off + 24) { d[i] = 0 }
        off += (40 + extra + idLen + nameLen + 7) & ~7
    }
    return d
}

/// nil when the two files are identical after masking snapshot dates, else a description.
func opsMaskedDifference(_ a: String, _ b: String) throws -> String? {
    let da = try opsMaskedImageBytes(a), db = try opsMaskedImageBytes(b)
    if da == db { return nil }
    let n = min(da.count, db.count)
    var diffs: [Int] = []
    var total = 0
    for i in 0..<n where da[i] != db[i] {
        total += 1
        if diffs.count < 12 { diffs.append(i) }
    }
    let listed = diffs.map { "0x\(String($0, radix: 16)): \(String(format: "%02x", da[$0])) vs \(String(format: "%02x", db[$0]))" }
    return "sizes \(da.count) vs \(db.count); \(total) differing bytes in the common part"
        + (listed.isEmpty ? "" : "; first: " + listed.joined(separator: ", "))
}

func opsExpectSameBytes(_ ours: String, _ qemu: String, maskSnapshotDates: Bool = true, context: String,
                        sourceLocation: SourceLocation = #_sourceLocation) throws {
    let diff = maskSnapshotDates ? try opsMaskedDifference(ours, qemu) : try fileDifference(ours, qemu)
    #expect(diff == nil, "\(context): our image differs from qemu-img's: \(diff ?? "")", sourceLocation: sourceLocation)
}

// MARK: - Snapshot listings

/// Replaces the DATE column (`YYYY-MM-DD hh:mm:ss`) of a `snapshot -l` listing.
func opsMaskDates(_ listing: String) -> String {
    listing.replacingOccurrences(of: #"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"#, with: "YYYY-MM-DD hh:mm:ss",
                                 options: .regularExpression)
}

/// (id, name) of every snapshot, from `qemu-img snapshot -l` (the judge's parser).
func opsSnapshots(_ image: String, cwd: String) async throws -> [(id: String, name: String)] {
    let out = try await qemuImg(["snapshot", "-l", image], cwd: cwd)
    return out.split(separator: "\n").dropFirst(2).compactMap { line in
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 2 else { return nil }
        return (String(f[0]), String(f[1]))
    }
}

// MARK: - Content

/// Guest content of `image` (or of one of its internal snapshots) via `qemu-img convert -O raw`.
func opsRaw(_ image: String, cwd: String, format: String = "qcow2", snapshotArg: String? = nil) async throws -> [UInt8] {
    let scratch = "scratch-\(UUID().uuidString.prefix(8)).raw"
    var args = ["convert", "-f", format, "-O", "raw"]
    if let snapshotArg { args += ["-l", snapshotArg] }
    args += [image, scratch]
    try await qemuImg(args, cwd: cwd)
    defer { try? FileManager.default.removeItem(atPath: cwd + "/" + scratch) }
    // Guard the test process's memory: large images are compared with opsExpectSameContent.
    let size = try fileSize(cwd + "/" + scratch)
    guard size <= 256 << 20 else {
        throw JSONFailure(description: "opsRaw: \(image) is \(size) bytes; too large to load, use opsExpectSameContent")
    }
    return [UInt8](try readFile(cwd + "/" + scratch))
}

/// `qemu-img compare -f FA -F FB A B` (streams; for images too large to load): identical
/// guest content, where the longer image must read as zeros past the shorter one's end.
func opsExpectSameContent(_ a: String, _ b: String, formatA: String = "qcow2", formatB: String = "qcow2", cwd: String,
                          context: String, sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let r = try await run("qemu-img", ["compare", "-f", formatA, "-F", formatB, a, b], cwd: cwd, timeout: 300)
    #expect(r.status == 0, "\(context): guest content differs (qemu-img compare): \(r)", sourceLocation: sourceLocation)
}

/// Where two byte arrays first differ, for messages.
func opsFirstDifference(_ a: [UInt8], _ b: [UInt8]) -> String? {
    if a == b { return nil }
    let n = min(a.count, b.count)
    if let i = (0..<n).first(where: { a[$0] != b[$0] }) {
        return "sizes \(a.count) vs \(b.count); first difference at \(i) (0x\(String(i, radix: 16))): "
            + "\(String(format: "%02x", a[i])) vs \(String(format: "%02x", b[i]))"
    }
    return "sizes \(a.count) vs \(b.count) (common prefix identical)"
}

// MARK: - info

/// `qemu-img info --output=json` as a dictionary, without `actual-size` (allocation
/// granularity of the host file system) and, optionally, more keys.
func opsInfo(_ image: String, cwd: String, format: String? = nil, dropping: [String] = []) async throws -> [String: Any] {
    var args = ["info", "--output=json"]
    if let format { args += ["-f", format] }
    args.append(image)
    var o = try #require(try parseJSON(try await qemuImg(args, cwd: cwd), "qemu-img info") as? [String: Any])
    for k in ["actual-size"] + dropping { o[k] = nil }
    return o
}

/// `qemu-img info` of the same file name in both twin directories agree (except actual-size).
func opsExpectSameInfo(_ twin: OpsTwin, _ name: String, format: String? = nil, context: String,
                       sourceLocation: SourceLocation = #_sourceLocation) async throws {
    let a = canonicalJSON(try await opsInfo(name, cwd: twin.ours, format: format))
    let b = canonicalJSON(try await opsInfo(name, cwd: twin.qemu, format: format))
    #expect(a == b, "\(context): qemu-img info differs:\nours:     \(a)\nqemu-img: \(b)", sourceLocation: sourceLocation)
}

// MARK: - map

/// The normalised `qemu-img map` (offsets dropped, adjacent equal extents merged).
func opsMap(_ image: String, cwd: String) async throws -> [WMapExtent] {
    try wNormalizedMap(try await qemuImg(["map", "--output=json", image], cwd: cwd))
}

// MARK: - Timing

/// Wall-clock seconds of an async operation.
func opsTimed<T>(_ body: () async throws -> T) async rethrows -> (T, Double) {
    let start = DispatchTime.now().uptimeNanoseconds
    let v = try await body()
    return (v, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
}

func opsMedian(_ xs: [Double]) -> Double {
    let s = xs.sorted()
    guard !s.isEmpty else { return 0 }
    return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
}

/// `qemu-img map` of two images agree on the qcow2-level layout: start/length/depth/present
/// and data-vs-zero-cluster. For data extents the `zero` flag is dropped: QEMU sets it when
/// the host file has a hole or an unwritten extent under an allocated cluster, which depends
/// on how the file system tracked earlier writes (e.g. fallocate'd COW tails), not on the
/// image.
func opsExpectSameLayout(_ a: String, _ b: String, cwd: String, context: String,
                         sourceLocation: SourceLocation = #_sourceLocation) async throws {
    func layout(_ image: String) async throws -> [WMapExtent] {
        var out: [WMapExtent] = []
        for var e in try await opsMap(image, cwd: cwd) {
            if e.data { e.zero = false }
            if var last = out.last, last.start + last.length == e.start, last.depth == e.depth,
               last.present == e.present, last.zero == e.zero, last.data == e.data {
                last.length += e.length
                out[out.count - 1] = last
            } else {
                out.append(e)
            }
        }
        return out
    }
    let la = try await layout(a), lb = try await layout(b)
    if la != lb {
        Issue.record("""
            \(context): qemu-img map layout differs
            \(a):
            \(la.prefix(40).map(\.description).joined(separator: "\n"))
            \(b):
            \(lb.prefix(40).map(\.description).joined(separator: "\n"))
            """, sourceLocation: sourceLocation)
    }
}
