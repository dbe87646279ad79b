import Foundation
import Testing
import QCOW2

// `qcow2 check` as a command: formats without a check, -q, open failures, locking, and
// memory that stays bounded by the file on images with hostile offsets and sizes.

@Suite("check: command line")
struct CheckCLITests {
    @Test("raw images have no check (exit 63), like qemu-img")
    func rawHasNoCheck() async throws {
        try await withTempDir("check-raw") { dir in
            let b = ImageBuilder(dir: dir)
            try await b.create("disk.raw", size: "1M", format: "raw")
            try await b.create("img.qcow2", size: "1M")
            for (args, file) in [([String](), "disk.raw"), (["-f", "raw"], "img.qcow2"), (["--output=json"], "disk.raw")] {
                let q = try await ckQemuCheck(args, file, cwd: dir)
                let o = try await ckOurCheck(args, file, cwd: dir)
                #expect(q.status == 63)
                #expect(o.status == 63, "\(args) \(file): \(o)")
                #expect(o.stdout == q.stdout)
                #expect(ckNormalizedStderr(o.stderr) == ckNormalizedStderr(q.stderr), "\(o.stderr) vs \(q.stderr)")
            }
        }
    }

    @Test("-q prints nothing on stdout and keeps the exit code")
    func quiet() async throws {
        try await withTempDir("check-quiet") { dir in
            let b = ImageBuilder(dir: dir)
            try await CkBase.standard(b)
            let img = CkImage(path: b.path("img.qcow2"))
            try img.set16(try img.refcount16(5), 2)                  // one leak
            for args in [["-q"], ["-q", "--output=json"], ["-q", "-r", "leaks"]] {
                try ckCopy(img.path, b.path("q.qcow2"))
                try ckCopy(img.path, b.path("o.qcow2"))
                let q = try await ckQemuCheck(args, "q.qcow2", cwd: dir)
                let o = try await ckOurCheck(args, "o.qcow2", cwd: dir)
                #expect(o.status == q.status, "\(args): \(o) vs \(q)")
                #expect(o.stdout.isEmpty && q.stdout.isEmpty, "\(args): \(o)")
                #expect(ckNormalizedStderr(o.stderr) == ckNormalizedStderr(q.stderr))
            }
        }
    }

    @Test("images that cannot be opened: exit 1 like qemu-img")
    func openFailures() async throws {
        try await withTempDir("check-open") { dir in
            let b = ImageBuilder(dir: dir)
            try await b.create("base.qcow2", size: "1M")
            try await b.create("overlay.qcow2", size: nil, backing: "base.qcow2")
            try FileManager.default.removeItem(atPath: b.path("base.qcow2"))
            try await b.create("data.qcow2", size: "1M", options: "data_file=data.raw")
            try FileManager.default.removeItem(atPath: b.path("data.raw"))
            try await b.create("badmagic.qcow2", size: "1M")
            try patchBE32(b.path("badmagic.qcow2"), at: 4, 7)     // version 7
            for file in ["overlay.qcow2", "data.qcow2", "badmagic.qcow2", "missing.qcow2"] {
                let q = try await ckQemuCheck([], file, cwd: dir)
                let o = try await ckOurCheck([], file, cwd: dir)
                #expect(q.status == 1)
                expectCleanFailure(o, code: 1)
                #expect(o.stdout.isEmpty)
            }
        }
    }

    @Test("repair takes the write lock; a check refuses an image being written")
    func locking() async throws {
        try await withTempDir("check-lock") { dir in
            let b = ImageBuilder(dir: dir)
            try await CkBase.standard(b)
            let path = b.path("img.qcow2")
            let writer = try QCOW2.FileHandle(path: path, writable: true)
            try writer.lockImage(forWriting: true)
            #expect(throws: (any Error).self) { _ = try ImageCheck(path: path, format: nil, repair: .all) }
            #expect(throws: (any Error).self) { _ = try ImageCheck(path: path, format: nil, repair: []) }
            writer.unlockImage()

            let reader = try QCOW2.FileHandle(path: path, writable: false)
            try reader.lockImage(forWriting: false)
            // Two checks may share the image; a repair may not run under a reader.
            let check = try ImageCheck(path: path, format: nil, repair: [])
            #expect(try check.run(repair: [], log: { _ in }).corruptions == 0)
            check.close()
            #expect(throws: (any Error).self) { _ = try ImageCheck(path: path, format: nil, repair: .leaks) }
            reader.unlockImage()
        }
    }

    @Test("memory stays bounded by the file with hostile sizes and offsets")
    func boundedMemory() async throws {
        try await withTempDir("check-memory") { dir in
            let b = ImageBuilder(dir: dir)
            try await CkBase.snapshot(b)
            let img = CkImage(path: b.path("img.qcow2"))
            // Both L1 tables move to a new last cluster and claim 4M entries (32 MiB, almost
            // all past the end of the file); the refcount table claims 8 MiB; a data cluster
            // and an L2 table point near 2^56.
            let cs = try img.clusterSize
            let end = (try fileSize(img.path) + cs - 1) / cs * cs
            try patch(img.path, at: end, [UInt8](repeating: 0, count: Int(cs)))
            try img.set64(end, try img.u64(try img.l1Entry(0)))
            try img.set64(end + 8, CkImage.copied | 0x00FF_FFFF_FFFF_0000)
            try img.set64(try img.l2Entry(1), CkImage.copied | 0x00FF_FFFF_FFFF_0000)
            try img.set64(40, end)
            try img.set32(36, 0x40_0000)
            try img.set64(try img.snapshotTable, end)
            try img.set32(try img.snapshotTable + 8, 0x40_0000)
            try img.set32(56, 128)
            let q = try await ckQemuCheck(["--output=json"], "img.qcow2", cwd: dir)
            let time = "/usr/bin/time"
            let measured = FileManager.default.isExecutableFile(atPath: time)
            let o = measured
                ? try await run(time, ["-f", "maxrss=%M", QCOW2Binary.path, "check", "--output=json", "img.qcow2"], cwd: dir, timeout: 60)
                : try await ckOurCheck(["--output=json"], "img.qcow2", cwd: dir)
            expectSane(o)
            #expect(o.status == q.status, "\(o) vs \(q)")
            #expect(CkCounts(json: o.stdout) == CkCounts(json: q.stdout), "\(o.stdout) vs \(q.stdout)")
            if measured, let line = o.stderr.split(separator: "\n").last(where: { $0.hasPrefix("maxrss=") }),
               let kb = Int(line.dropFirst("maxrss=".count)) {
                // qemu-img itself holds the 32 MiB L1 tables; we read only what the file holds.
                #expect(kb < 64 * 1024, "maximum resident set \(kb) KiB")
            }
        }
    }

    @Test("a repaired image reads like qemu-img's repair of the same image (library API)")
    func libraryRoundTrip() async throws {
        try await withTempDir("check-api") { dir in
            let b = ImageBuilder(dir: dir)
            try await CkBase.standard(b)
            let img = CkImage(path: b.path("img.qcow2"))
            try img.set16(try img.refcount16(6), 0)        // needs a rebuild
            try img.set16(try img.refcount16(5), 2)        // a leak
            var lines: [String] = []
            let check = try ImageCheck(path: img.path, format: nil, repair: .all)
            let first = try check.run(repair: .all) { lines.append($0) }
            #expect(first.corruptionsFixed == 1 && first.leaksFixed == 1, "\(first)")
            #expect(lines.contains("Rebuilding refcount structure"))
            let second = try check.run(repair: []) { _ in }
            #expect(second.corruptions == 0 && second.leaks == 0 && second.checkErrors == 0, "\(second)")
            check.close()
            let q = try await ckQemuCheck([], "img.qcow2", cwd: dir)
            #expect(q.status == 0, "\(q)")
        }
    }
}
