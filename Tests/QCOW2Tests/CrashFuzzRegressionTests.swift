import Foundation
import QCOW2Format
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// Regressions for what the fuzz targets (Fuzz/, scripts/fuzz.sh) and the hostile inputs built
// while writing them found. Each feeds the input to the same API or command the target uses
// and expects a thrown error or a clean result — never a trap. API calls that trap today run
// in an exit test (a child process), so a trap fails that test instead of killing the run.

enum CrashFuzzInputs {
    /// A one-entry snapshot table (v3 entry, 24 bytes of extra data) whose name is
    /// `nameLength` bytes of 0xFF (invalid UTF-8).
    static func snapshotTable(nameLength: Int, id: [UInt8] = Array("1".utf8)) -> [UInt8] {
        var b: [UInt8] = []
        b.appendBE(UInt64(0x30000))      // l1_table_offset
        b.appendBE(UInt32(16))           // l1_size
        b.appendBE(UInt16(id.count))
        b.appendBE(UInt16(nameLength))
        b.appendBE(UInt32(0))            // date
        b.appendBE(UInt32(0))
        b.appendBE(UInt64(0))            // vm clock
        b.appendBE(UInt32(0))            // vm state size
        b.appendBE(UInt32(24))           // extra data size
        b += [UInt8](repeating: 0, count: 24)
        b += id
        b += [UInt8](repeating: 0xFF, count: nameLength)
        return b
    }
}

@Suite("Reliability: fuzzing regressions")
struct CrashFuzzRegressionTests {
    // MARK: SnapshotTableEntry: names that are not UTF-8

    /// Found while building the `snapshot` target (its round trip; beyond libFuzzer's input
    /// size): `parseTable` decodes id and name with `String(decoding:as: UTF8.self)`, so each
    /// invalid byte becomes U+FFFD (3 bytes). A name of more than 21845 invalid bytes then
    /// no longer fits the u16 length field and `serialize()` traps
    /// (SnapshotTableEntry.swift: `UInt16(nameBytes.count)`, "Not enough bits to represent
    /// the passed value"); reached from `createSnapshot`/`deleteSnapshot` →
    /// `writeSnapshotTable` → `tableSize`. Smaller invalid names are silently rewritten.
    /// Expected: parse rejects such a table (throws), or keeps the raw bytes so the table
    /// is rewritten byte for byte. Fixed: id and name are kept as raw bytes, as in QEMU.
    @Test("a snapshot name that is not UTF-8 survives parse → serialize (no trap)")
    func snapshotNameNotUTF8() async {
        await #expect(processExitsWith: .success) {
            let table = CrashFuzzInputs.snapshotTable(nameLength: 30_000)
            guard let entries = try? SnapshotTableEntry.parseTable(table, count: 1, clusterSize: 65536) else { return }
            let bytes = SnapshotTableEntry.serializeTable(entries)
            let again = try SnapshotTableEntry.parseTable(bytes, count: 1, clusterSize: 65536)
            precondition(again == entries, "the table changed in a round trip")
        }
    }

    @Test("short names that are not UTF-8 are kept byte for byte")
    func shortSnapshotNameNotUTF8() throws {
        let table = CrashFuzzInputs.snapshotTable(nameLength: 40)
        guard let entries = try? SnapshotTableEntry.parseTable(table, count: 1, clusterSize: 65536) else { return }
        #expect(SnapshotTableEntry.serializeTable(entries) == table,
                "an entry whose name is not UTF-8 is not rewritten byte for byte (the name is replaced by U+FFFD)")
    }

    /// The same through the CLI: `qcow2 snapshot -c` on an image whose existing snapshot has
    /// such a name must fail cleanly or succeed — not crash (it trapped before names were
    /// kept as bytes). The listing must match `qemu-img snapshot -l` byte for byte (QEMU
    /// prints the raw name, cut at 255 bytes).
    @Test("snapshot create on an image with a 30000-byte non-UTF-8 snapshot name does not crash")
    func snapshotCreateWithHostileName() async throws {
        try #require(FileManager.default.isExecutableFile(atPath: QCOW2Binary.path), "build qcow2 first (`swift build`)")
        try await withTempDir("fuzz-snapname") { dir in
            let path = dir + "/img.qcow2"
            try await qemuImg(["create", "-q", "-f", "qcow2", "img.qcow2", "1M"], cwd: dir)
            try await qemuImg(["snapshot", "-c", "s", "img.qcow2"], cwd: dir)
            // Replace the table by one whose entry has the long name (same L1 pointer), at the
            // end of the file (not refcounted: qemu-img check calls that a leak-free
            // corruption, but the engine must still not trap).
            var image = [UInt8](try readFile(path))
            let tableOffset = Int(try readBE64(path, at: 64))
            let l1 = Array(image[tableOffset..<(tableOffset + 12)])
            var table = CrashFuzzInputs.snapshotTable(nameLength: 30_000)
            table.replaceSubrange(0..<12, with: l1)
            let newOffset = (image.count + 65535) / 65536 * 65536
            image += [UInt8](repeating: 0, count: newOffset - image.count) + table
            image += [UInt8](repeating: 0, count: (65536 - image.count % 65536) % 65536)
            image.replaceSubrange(64..<72, with: withUnsafeBytes(of: UInt64(newOffset).bigEndian, Array.init))
            try writeFile(path, Data(image))
            let ours = try await qcow2Bytes(["snapshot", "-l", "img.qcow2"], cwd: dir)
            let qemu = try await qemuImgBytes(["snapshot", "-l", "img.qcow2"], cwd: dir)
            #expect(ours == qemu, "snapshot -l differs from qemu-img's:\n\(String(decoding: ours, as: UTF8.self))\n\(String(decoding: qemu, as: UTF8.self))")
            #expect(qemu.count > 255 && qemu.contains(0xFF), "qemu-img did not list the raw name")
            let ourInfo = try await qcow2Bytes(["info", "img.qcow2"], cwd: dir)
            let qemuInfo = try await qemuImgBytes(["info", "img.qcow2"], cwd: dir)
            #expect(ourInfo == qemuInfo, "info differs from qemu-img's:\n\(String(decoding: ourInfo, as: UTF8.self))\n\(String(decoding: qemuInfo, as: UTF8.self))")
            let r = try await qcow2(["snapshot", "-c", "x", "img.qcow2"], cwd: dir, timeout: 60)
            expectSane(r)
            #expect(r.status == 0 || r.status == 1, "\(r)")
            if r.status == 0 {
                // The old entry is rewritten byte for byte: its 30000-byte name is intact.
                let list = try await qcow2Bytes(["snapshot", "-l", "img.qcow2"], cwd: dir)
                #expect(list == (try await qemuImgBytes(["snapshot", "-l", "img.qcow2"], cwd: dir)))
                let table = Int(try readBE64(path, at: 64))
                let bytes = [UInt8](try readFile(path))
                let entries = try SnapshotTableEntry.parseTable(Array(bytes[table...]), count: 2, clusterSize: 65536)
                #expect(entries[0].nameBytes == [UInt8](repeating: 0xFF, count: 30_000))
                #expect(entries[1].nameBytes == Array("x".utf8))
            }
        }
    }

    // MARK: Pointers far past the end of the file

    /// Found by the `image-write` target (minimized by hand to one L2 entry): an L2 entry of
    /// a 6 KiB image points at host offset 256 GiB (0x4000000000). `qcow2 snapshot -c`
    /// raises that cluster's refcount, which grows the refcount structures to cover it: the
    /// file becomes 256 GiB (sparse), and `check` then takes minutes. A copy-on-write over
    /// that cluster does the same while freeing it ("refcount of cluster 268435456 would drop
    /// below zero", file 256 GiB). QEMU 7.2 behaves the same (its snapshot create fails with
    /// -EAGAIN after growing the file); docs/reliability.md asks for stricter: a data pointer
    /// past the end of the file is corruption — fail the request, do not grow the file.
    ///
    /// Fixed: a refcount change for a cluster that metadata names beyond the end of the
    /// file marks the image corrupt and fails (snapshot create before changing anything;
    /// the COW write's data lands, the free of the old cluster is refused at flush), and a
    /// decrement never creates a refcount block.
    @Test("an L2 entry pointing 256 GiB past the end does not grow the file",
          arguments: [["snapshot", "-c", "fz", "img.qcow2"], ["io", "-c", "write -P 0x22 3k 512", "img.qcow2"]])
    func pointerPastEnd(_ args: [String]) async throws {
        try #require(FileManager.default.isExecutableFile(atPath: QCOW2Binary.path), "build qcow2 first (`swift build`)")
        try await withTempDir("fuzz-farptr") { dir in
            let path = dir + "/img.qcow2"
            try await qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=1k", "img.qcow2", "256k"], cwd: dir)
            try await qemuIO(path, ["write -P 0x11 0 4k"], cwd: dir)
            let l1 = try readBE64(path, at: 40)
            let l2 = try readBE64(path, at: l1) & 0x00FF_FFFF_FFFF_FE00
            try patchBE64(path, at: l2 + 3 * 8, 0x40_0000_0000)  // guest 3k → host 256 GiB, not copied
            let before = try fileSize(path)
            let r = try await qcow2(args, cwd: dir, timeout: 120)
            expectSane(r)
            let after = try fileSize(path)
            #expect(after < before + (64 << 20), "`qcow2 \(args.joined(separator: " "))` grew a \(before)-byte image to \(after) bytes: \(r)")
            #expect(r.status == 1 && r.stderr.contains("Marking image as corrupt") && r.stderr.contains("beyond the end of the image file"),
                    "expected a corruption error: \(r)")
            // The corrupt bit is set (incompatible feature bit 1), so a read-write open is refused…
            #expect(try readBE64(path, at: 72) & 2 != 0, "image not marked corrupt")
            let again = try await qcow2(args, cwd: dir, timeout: 60)
            let afterAgain = try fileSize(path)
            #expect(again.status == 1 && afterAgain == after, "a marked image was modified: \(again)")
            // …and nothing beyond the injected damage (one leaked cluster; the bad pointer
            // itself, unless the COW replaced it) is wrong, as qemu-img check sees it.
            let check = try await run("qemu-img", ["check", "img.qcow2"], cwd: dir, timeout: 120)
            let report = check.stdout + check.stderr
            #expect(report.components(separatedBy: "Leaked cluster").count == 2 && report.contains("1 leaked clusters")
                    && !report.contains("errors were found") || report.contains("1 errors were found"), "\(check)")
            #expect([2, 3].contains(check.status ?? -1), "\(check)")
            try? FileManager.default.removeItem(atPath: path)  // sparse, but huge
        }
    }

    /// Freeing a cluster that no refcount block covers (inside the file, refcount 0: the
    /// reference was corrupt) must not create a refcount block for it: the image is marked
    /// corrupt and no refcount structure is added.
    @Test("freeing a cluster without a refcount block marks the image corrupt and allocates nothing")
    func freeWithoutRefblock() async throws {
        try await withTempDir("fuzz-norefblock") { dir in
            let path = dir + "/img.qcow2"
            try await qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=1k", "img.qcow2", "256k"], cwd: dir)
            try await qemuIO(path, ["write -P 0x11 0 4k"], cwd: dir)
            // 16-bit refcounts, 1 KiB clusters: one refcount block covers 512 KiB. Make the
            // file 1 MiB long and point guest 3k at 600 KiB, which no block covers.
            let handle = try Foundation.FileHandle(forWritingTo: URL(fileURLWithPath: path))
            try handle.truncate(atOffset: 1 << 20)
            try handle.close()
            let l1 = try readBE64(path, at: 40)
            let l2 = try readBE64(path, at: l1) & 0x00FF_FFFF_FFFF_FE00
            try patchBE64(path, at: l2 + 3 * 8, 600 << 10)
            let reftable = try readBE64(path, at: 48)
            #expect(try readBE64(path, at: reftable + 8) == 0)
            let r = try await qcow2(["io", "-c", "write -P 0x22 3k 512", "img.qcow2"], cwd: dir, timeout: 60)
            expectSane(r)
            #expect(r.status == 1 && r.stderr.contains("Marking image as corrupt") && r.stderr.contains("no refcount block"), "\(r)")
            #expect(try readBE64(path, at: readBE64(path, at: 48) + 8) == 0, "a refcount block was created for the freed cluster")
            #expect(try fileSize(path) == 1 << 20)
            #expect(try readBE64(path, at: 72) & 2 != 0, "image not marked corrupt")
        }
    }
}
