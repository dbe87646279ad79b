import Foundation
import Testing

// Lazy refcounts and crash recovery. `qcow2 io … -c abort` simulates a crash (like qemu-io's
// abort): the image is left with the dirty bit (incompatible feature bit 0, header offset
// 72) set. Expected: qemu-img check finds no corruption (leaks are allowed: refcounts may be
// ahead of the L2 tables); a read-only open leaves the file untouched; a read-write open
// rebuilds the refcounts and clears the dirty bit; qemu-img check is then clean; flushed data
// reads back, and every unflushed cluster reads either as before or as written. QEMU
// repairing a copy of the same crashed image must give the same guest content, and our
// engine must repair an image crashed by qemu-io the way qemu-io does.

/// `qcow2 io -c … -c abort` with the Swift backtracer off (it only slows the expected abort).
func opsOurIOCrash(_ file: String, _ commands: [String], cwd: String) async throws -> ToolResult {
    var args = ["SWIFT_BACKTRACE=enable=no", QCOW2Binary.path, "io", "-f", "qcow2"]
    for c in commands + ["abort"] { args += ["-c", c] }
    args.append(file)
    return try await run("env", args, cwd: cwd, timeout: 60)
}

func opsDirtyBit(_ path: String) throws -> Bool { try readBE64(path, at: 72) & 1 == 1 }

@Suite("Ops: lazy refcounts, crash and repair")
struct OpsLazyRefcountTests {
    static let layouts = ["lazy_refcounts=on", "lazy_refcounts=on,cluster_size=4k", "lazy_refcounts=on,extended_l2=on",
                          "lazy_refcounts=on,refcount_bits=1,cluster_size=512", "lazy_refcounts=on,refcount_bits=64"]

    /// flushed: 0x11 at 0..1M, 0x12 at 3M..3M+100k; unflushed: 0x22 at 2M..3M (new
    /// clusters), 0x23 over the first flushed cluster (in place), 0x24 at 6M (new).
    static let crashScript = ["write -P 0x11 0 1M", "write -P 0x12 3M 100k", "flush",
                              "write -P 0x22 2M 1M", "write -P 0x23 0 64k", "write -P 0x24 6M 200k"]
    static let flushedReads = ["read -P 0x11 64k 960k", "read -P 0x12 3M 100k"]

    /// Every `unit`-sized piece of `range` reads all `old` or all `new`.
    func expectOldOrNew(_ bytes: [UInt8], _ range: Range<Int>, old: UInt8, new: UInt8, unit: Int, context: String) {
        var o = range.lowerBound
        while o < range.upperBound {
            let end = min(o + unit, range.upperBound)
            let piece = bytes[o..<end]
            #expect(piece.allSatisfy { $0 == old } || piece.allSatisfy { $0 == new },
                    "\(context): unflushed range at \(o) reads neither all 0x\(String(old, radix: 16)) nor all 0x\(String(new, radix: 16))")
            o = end
        }
    }

    func expectRepairedContent(_ bytes: [UInt8], clusterSize: Int, context: String) {
        expectOldOrNew(bytes, 0..<65536, old: 0x11, new: 0x23, unit: min(clusterSize, 65536), context: context)
        #expect(bytes[65536..<(1 << 20)].allSatisfy { $0 == 0x11 }, "\(context): flushed data 0x11 lost")
        #expect(bytes[(3 << 20)..<((3 << 20) + 102400)].allSatisfy { $0 == 0x12 }, "\(context): flushed data 0x12 lost")
        expectOldOrNew(bytes, (2 << 20)..<(3 << 20), old: 0, new: 0x22, unit: clusterSize, context: context)
        expectOldOrNew(bytes, (6 << 20)..<((6 << 20) + 200 * 1024), old: 0, new: 0x24, unit: clusterSize, context: context)
        #expect(bytes[(4 << 20)..<((4 << 20) + 65536)].allSatisfy { $0 == 0x33 }, "\(context): the write after the repair is lost")
    }

    func clusterSize(_ opts: String) -> Int {
        if opts.contains("cluster_size=512") { return 512 }
        if opts.contains("cluster_size=4k") { return 4096 }
        return 65536
    }

    @Test("our crash: dirty bit, no corruption, read-only open untouched, read-write open repairs", arguments: layouts)
    func ourCrash(_ opts: String) async throws {
        try await withTempDir("lazy-ours") { dir in
            let c = try await qcow2(["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", "16M"], cwd: dir)
            expectSuccess(c)
            let crash = try await opsOurIOCrash("img.qcow2", Self.crashScript, cwd: dir)
            #expect(crash.crashed && !crash.timedOut, "`abort` must end the process like an abort: \(crash)")
            let path = dir + "/img.qcow2"
            #expect(try opsDirtyBit(path), "\(opts): the dirty bit is not set after the crash")

            // qemu-img sees a dirty image without corruption.
            let qInfo = try #require(try parseJSON(try await qemuImg(["info", "--output=json", "img.qcow2"], cwd: dir), "info") as? [String: Any])
            #expect(qInfo["dirty-flag"] as? Bool == true, "\(opts): qemu-img info does not report the dirty flag: \(qInfo)")
            let ourInfo = try await qcow2(["info", "--output=json", "img.qcow2"], cwd: dir)
            expectSuccess(ourInfo)
            if ourInfo.succeeded {
                let oi = try parseJSON(ourInfo.stdout, "qcow2 info") as? [String: Any]
                #expect(oi?["dirty-flag"] as? Bool == true, "\(opts): our info does not report the dirty flag")
            }
            let check = try await run("qemu-img", ["check", "--output=json", "img.qcow2"], cwd: dir)
            let report = try parseJSON(check.stdout, "qemu-img check") as? [String: Any]
            for key in ["corruptions", "check-errors"] {
                #expect((report?[key] as? NSNumber)?.intValue ?? 0 == 0, "\(opts): crashed image has \(key): \(check)")
            }
            #expect(check.status == 0 || check.status == 3, "\(opts): qemu-img check of the crashed image: \(check)")

            try wCopy(path, dir + "/crashed.qcow2")
            try wCopy(path, dir + "/viaqemu.qcow2")

            // Read-only open: flushed data reads, nothing is written.
            let ro = try await wOurIO("img.qcow2", Self.flushedReads, readOnly: true, cwd: dir)
            expectSane(ro)
            #expect(wIOClean(ro), "\(opts): read-only reads of the crashed image failed: \(ro)")
            #expect(try readFile(path) == readFile(dir + "/crashed.qcow2"), "\(opts): a read-only open changed the crashed image")

            // Read-write open: repair, clear the dirty bit.
            let rw = try await wOurIO("img.qcow2", Self.flushedReads + ["write -P 0x33 4M 64k"], cwd: dir)
            expectSane(rw)
            #expect(wIOClean(rw), "\(opts): read-write reopen failed: \(rw)")
            #expect(try !opsDirtyBit(path), "\(opts): the dirty bit is still set after a read-write open")
            try await wExpectCleanCheck("img.qcow2", cwd: dir, context: "\(opts) after repair")
            try await qemuIO("img.qcow2", Self.flushedReads + ["read -P 0x33 4M 64k"], cwd: dir)
            let ours = try await opsRaw("img.qcow2", cwd: dir)
            expectRepairedContent(ours, clusterSize: clusterSize(opts), context: opts)

            // QEMU repairing the same crashed image sees the same guest content.
            try await qemuIO("viaqemu.qcow2", Self.flushedReads + ["write -P 0x33 4M 64k"], cwd: dir)
            let viaQemu = try await opsRaw("viaqemu.qcow2", cwd: dir)
            if let d = opsFirstDifference(ours, viaQemu) {
                Issue.record("\(opts): content after our repair differs from QEMU's repair of the same crashed image: \(d)")
            }
        }
    }

    @Test("an image crashed by qemu-io is repaired by us like qemu-io repairs it", arguments: layouts)
    func qemuCrash(_ opts: String) async throws {
        try await withTempDir("lazy-qemu") { dir in
            let b = ImageBuilder(dir: dir)
            try await b.create("img.qcow2", size: "16M", options: opts)
            var args = ["-f", "qcow2"]
            for c in Self.crashScript + ["abort"] { args += ["-c", c] }
            _ = try await run("qemu-io", args + ["img.qcow2"], cwd: dir, timeout: 60)
            let path = dir + "/img.qcow2"
            try #require(try opsDirtyBit(path), "judge sanity: qemu-io's abort left no dirty bit")
            try wCopy(path, dir + "/viaqemu.qcow2")
            try wCopy(path, dir + "/crashed.qcow2")

            let ro = try await wOurIO("img.qcow2", Self.flushedReads, readOnly: true, cwd: dir)
            expectSane(ro)
            #expect(wIOClean(ro), "\(opts): read-only reads of qemu's crashed image failed: \(ro)")
            #expect(try readFile(path) == readFile(dir + "/crashed.qcow2"), "\(opts): a read-only open changed the crashed image")

            let rw = try await wOurIO("img.qcow2", Self.flushedReads + ["write -P 0x33 4M 64k"], cwd: dir)
            expectSane(rw)
            #expect(wIOClean(rw), "\(opts): read-write reopen of qemu's crashed image failed: \(rw)")
            #expect(try !opsDirtyBit(path), "\(opts): the dirty bit is still set after our read-write open")
            try await wExpectCleanCheck("img.qcow2", cwd: dir, context: "\(opts) repaired by us")
            let ours = try await opsRaw("img.qcow2", cwd: dir)
            expectRepairedContent(ours, clusterSize: clusterSize(opts), context: opts + " (qemu crash)")
            try await qemuIO("viaqemu.qcow2", Self.flushedReads + ["write -P 0x33 4M 64k"], cwd: dir)
            let viaQemu = try await opsRaw("viaqemu.qcow2", cwd: dir)
            if let d = opsFirstDifference(ours, viaQemu) {
                Issue.record("\(opts): our repair of qemu's crashed image differs from qemu-io's repair: \(d)")
            }
        }
    }

    @Test("lazy refcounts, orderly close: no dirty bit, clean, same bytes as qemu-io")
    func orderlyClose() async throws {
        try await withTwin("lazy-close") { t in
            try await t.builder.create("img.qcow2", size: "16M", options: "lazy_refcounts=on")
            try t.mirror()
            let cmds = Self.crashScript + ["write -z 8M 1M", "discard 0 64k"]
            let o = try await wOurIO("img.qcow2", cmds, cwd: t.ours)
            expectSuccess(o)
            try await qemuIO("img.qcow2", cmds, cwd: t.qemu)
            #expect(try !opsDirtyBit(t.o("img.qcow2")), "dirty bit left set after an orderly close")
            try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: "lazy refcounts, orderly close")
            try opsExpectSameBytes(t.o("img.qcow2"), t.q("img.qcow2"), maskSnapshotDates: false, context: "lazy refcounts, orderly close")
        }
    }
}
