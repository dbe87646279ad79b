import Foundation
import Testing

// Real NBD clients (libnbd's nbdinfo/nbdcopy/Python binding, QEMU's qemu-img/qemu-io, fio)
// against `qcow2 serve`, with qemu-nbd as the reference where outputs can be compared.

/// nbdinfo output without the lines that legitimately differ between servers.
private func comparableInfo(_ text: String) -> [String] {
    text.split(separator: "\n").map(String.init).filter { !$0.contains("content:") && !$0.contains("uri:") }
}

@Suite("NBD interop with real clients")
struct InteropTests {
    @Test("nbdinfo summary and --json match qemu-nbd's for the same export (socket activation)")
    func nbdinfoSummary() async throws {
        try QCOW2Binary.require()
        try await withTempDir("info") { dir in
            try await makeFixture(in: dir)
            for extra in [["-r"], ["-r", "-A"], ["-A", "-e", "4"], ["-e", "2", "-r"]] {
                let ours = try await must("nbdinfo", ["--", "[", QCOW2Binary.path, "serve", "-D", "test qcow2"] + extra + ["top.qcow2", "]"], cwd: dir)
                // qemu-nbd needs a private copy when writable (image locks).
                let image = extra.contains("-r") ? "top.qcow2" : "copy.qcow2"
                if image == "copy.qcow2" { try await must("cp", ["top.qcow2", "copy.qcow2"], cwd: dir) }
                let reference = try await must("nbdinfo", ["--", "[", "qemu-nbd", "-f", "qcow2", "-D", "test qcow2"] + extra + [image, "]"], cwd: dir)
                #expect(comparableInfo(ours) == comparableInfo(reference), "flags \(extra)\nours:\n\(ours)\nqemu-nbd:\n\(reference)")
            }
            let json = try await must("nbdinfo", ["--json", "--", "[", QCOW2Binary.path, "serve", "-r", "-A", "top.qcow2", "]"], cwd: dir)
            let object = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any])
            #expect(object["protocol"] as? String == "newstyle-fixed")
            #expect(object["structured"] as? Bool == true)
            let export = try #require((object["exports"] as? [[String: Any]])?.first)
            #expect((export["export-size"] as? NSNumber)?.intValue == 64 << 20)
            #expect(export["is_read_only"] as? Bool == true)
            #expect(export["can_flush"] as? Bool == true)
            #expect(export["can_trim"] as? Bool == false)
            #expect((export["block_size_maximum"] as? NSNumber)?.intValue == 32 << 20)
            #expect((export["contexts"] as? [String]) == ["base:allocation", "qemu:allocation-depth"])
        }
    }

    @Test("nbdinfo --map and --map=qemu:allocation-depth equal qemu-nbd's, on the fixture and on a deep chain")
    func nbdinfoMaps() async throws {
        try QCOW2Binary.require()
        try await withTempDir("map") { dir in
            try await makeFixture(in: dir)
            let chain = try await makeDeepChain(depth: 40, in: dir)
            for image in ["top.qcow2", chain] {
                for map in ["--map", "--map=qemu:allocation-depth", "--map=base:allocation"] {
                    let ours = try await must("nbdinfo", [map, "--", "[", QCOW2Binary.path, "serve", "-r", "-A", image, "]"], cwd: dir)
                    let reference = try await must("nbdinfo", [map, "--", "[", "qemu-nbd", "-r", "-A", "-f", "qcow2", image, "]"], cwd: dir)
                    #expect(ours == reference, "\(image) \(map)\nours:\n\(ours)\nqemu-nbd:\n\(reference)")
                    #expect(!ours.isEmpty)
                }
            }
            // Without -A the depth context is not offered.
            let r = try await run("nbdinfo", ["--map=qemu:allocation-depth", "--", "[", QCOW2Binary.path, "serve", "-r", "top.qcow2", "]"], cwd: dir)
            #expect(r.status == 1 && r.stderr.contains("does not support"), "\(r)")
            // Over TCP with --totals, through a named export.
            try await withServer(["-r", "-A"], image: chain, dir: dir) { server in
                let totals = try await must("nbdinfo", ["--map", "--totals", server.uri], cwd: dir)
                #expect(totals.contains("data") && totals.contains("hole,zero"), "\(totals)")
            }
        }
    }

    @Test("nbdinfo --can / --is report the advertised capabilities")
    func nbdinfoCan() async throws {
        try QCOW2Binary.require()
        try await withTempDir("can") { dir in
            try await makeFixture(in: dir)
            func can(_ what: [String], _ serveArgs: [String]) async throws -> Int32? {
                let r = try await run("nbdinfo", what + ["--", "[", QCOW2Binary.path, "serve"] + serveArgs + ["top.qcow2", "]"], cwd: dir)
                return r.status
            }
            #expect(try await can(["--is", "read-only"], ["-r"]) == 0)
            #expect(try await can(["--can", "write"], ["-r"]) == 2)
            #expect(try await can(["--can", "flush"], ["-r"]) == 0)
            #expect(try await can(["--can", "trim"], ["-r"]) == 2)
            #expect(try await can(["--can", "zero"], ["-r"]) == 2)
            #expect(try await can(["--can", "cache"], ["-r"]) == 0)
            #expect(try await can(["--can", "df"], ["-r"]) == 0)
            #expect(try await can(["--can", "multi-conn"], ["-r"]) == 2)
            #expect(try await can(["--can", "multi-conn"], ["-r", "-e", "8"]) == 0)
            #expect(try await can(["--can", "write"], ["--snapshot"]) == 0)
            #expect(try await can(["--can", "trim"], ["--snapshot"]) == 0)
            #expect(try await can(["--can", "zero"], ["--snapshot"]) == 0)
            #expect(try await can(["--can", "fast-zero"], ["--snapshot"]) == 0)
            #expect(try await can(["--can", "fua"], ["--snapshot"]) == 0)
            #expect(try await can(["--can", "connect"], ["-r"]) == 0)
            #expect(try await can(["--is", "rotational"], ["-r"]) == 2)
        }
    }

    @Test("nbdcopy out of an export over TCP, and into a writable export over a Unix socket")
    func nbdcopy() async throws {
        try await withTempDir("copy") { dir in
            try await makeFixture(in: dir)
            try await withServer(["-r", "-e", "4"], image: "top.qcow2", dir: dir) { server in
                try await must("nbdcopy", [server.uri, "out.raw"], cwd: dir)
                let cmp = try await must("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "out.raw"], cwd: dir)
                #expect(cmp.contains("Images are identical"))
            }
            // Into a fresh writable image, from a captive qemu-nbd as the source.
            try await must("qemu-img", ["create", "-q", "-f", "qcow2", "target.qcow2", "64M"], cwd: dir)
            try await withServer(["-e", "4"], image: "target.qcow2", listen: .unix, dir: dir) { server in
                try await must("nbdcopy", ["--flush", "--", "[", "qemu-nbd", "-r", "-f", "qcow2", "top.qcow2", "]", server.uri], cwd: dir)
                let cmp = try await must("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", server.uri, "top.qcow2"], cwd: dir)
                #expect(cmp.contains("Images are identical"))
            }
            let check = try await run("qemu-img", ["check", "target.qcow2"], cwd: dir)
            #expect(check.succeeded && check.stdout.contains("No errors were found"), "\(check)")
            let cmp = try await must("qemu-img", ["compare", "target.qcow2", "top.qcow2"], cwd: dir)
            #expect(cmp.contains("Images are identical"))
            // nbdcopy with a captive server of ours on both sides.
            try await must("nbdcopy", ["--", "[", QCOW2Binary.path, "serve", "-r", "top.qcow2", "]", "captive.raw"], cwd: dir)
            let cmp2 = try await must("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", "top.qcow2", "captive.raw"], cwd: dir)
            #expect(cmp2.contains("Images are identical"))
        }
    }

    @Test("qemu-img info/map/convert/compare over nbd:// and nbd+unix://")
    func qemuImg() async throws {
        try await withTempDir("qemu-img") { dir in
            try await makeFixture(in: dir)
            for listen in [Listen.tcp, .unix] {
                try await withServer(["-r", "-e", "2"], image: "top.qcow2", listen: listen, dir: dir) { server in
                    let info = try await must("qemu-img", ["info", server.uri], cwd: dir)
                    #expect(info.contains("virtual size: 64 MiB (67108864 bytes)"), "\(info)")
                    let ours = try await must("qemu-img", ["map", "-f", "raw", "--output=json", server.uri], cwd: dir)
                    try await withServer(["-r", "-f", "qcow2"], image: "top.qcow2", listen: .unix, dir: dir, qemu: true) { reference in
                        let theirs = try await must("qemu-img", ["map", "-f", "raw", "--output=json", reference.uri], cwd: dir)
                        #expect(ours == theirs, "ours:\n\(ours)\nqemu-nbd:\n\(theirs)")
                    }
                    try await must("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", server.uri, "conv.qcow2"], cwd: dir)
                    var cmp = try await must("qemu-img", ["compare", "conv.qcow2", "top.qcow2"], cwd: dir)
                    #expect(cmp.contains("Images are identical"))
                    cmp = try await must("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", server.uri, "top.qcow2"], cwd: dir)
                    #expect(cmp.contains("Images are identical"))
                    try FileManager.default.removeItem(atPath: dir + "/conv.qcow2")
                }
            }
            // Convert into a writable export (-n: the target exists).
            try await must("qemu-img", ["create", "-q", "-f", "qcow2", "w.qcow2", "64M"], cwd: dir)
            try await withServer([], image: "w.qcow2", dir: dir) { server in
                try await must("qemu-img", ["convert", "-n", "-f", "qcow2", "-O", "raw", "top.qcow2", server.uri], cwd: dir)
                let cmp = try await must("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", server.uri, "top.qcow2"], cwd: dir)
                #expect(cmp.contains("Images are identical"))
            }
            let check = try await run("qemu-img", ["check", "w.qcow2"], cwd: dir)
            #expect(check.succeeded, "\(check)")
            #expect(try await must("qemu-img", ["compare", "w.qcow2", "top.qcow2"], cwd: dir).contains("Images are identical"))
        }
    }

    @Test("qemu-io pattern writes, zero writes, discards and FUA through the server; the image checks clean and equals the expected raw")
    func qemuIOWrites() async throws {
        try await withTempDir("qemu-io") { dir in
            try await makeFixture(in: dir)
            try await must("cp", ["top.qcow2", "rw.qcow2"], cwd: dir)
            try await must("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", "top.qcow2", "expected.raw"], cwd: dir)
            let writes = ["write -P 0x11 40M 64K", "write -z 41M 1M", "write -z -u 42M 1M", "discard 43M 1M", "flush",
                          "write -f -P 0x22 44M 4K", "write -P 0x33 100 1000", "write -P 0x44 8M 3M", "write -z 520K 8K",
                          "write -P 0x55 67108352 512"]
            let reads = ["read -P 0x11 40M 64K", "read -P 0 41M 1M", "read -P 0 42M 1M", "read -P 0x22 44M 4K",
                         "read -P 0x33 100 1000", "read -P 0x44 8M 3M", "read -P 0 520K 8K", "read -P 0x55 67108352 512",
                         "read -P 0xcc 528K 4K"]
            for mode in ["ignore", "unmap"] {
                try await withServer(["--discard=\(mode)", "-e", "2"], image: "rw.qcow2", dir: dir) { server in
                    let w = try await run("qemu-io", ["-f", "raw"] + writes.flatMap { ["-c", $0] } + [server.uri], cwd: dir)
                    #expect(w.succeeded && !w.stdout.contains("failed") && !w.stderr.contains("failed"), "\(w)")
                    // A second client reads back what the first wrote.
                    let r = try await run("qemu-io", ["-r", "-f", "raw"] + reads.flatMap { ["-c", $0] } + [server.uri], cwd: dir)
                    #expect(r.succeeded && !r.stdout.contains("Pattern verification failed") && !r.stdout.contains("failed"), "\(r)")
                }
            }
            // The same commands on the raw copy give the expected content (discard reads as
            // zeros in qcow2 here as well, since no backing data lies under 43M).
            try await must("qemu-io", ["-f", "raw"] + writes.flatMap { ["-c", $0] } + ["expected.raw"], cwd: dir)
            let check = try await run("qemu-img", ["check", "rw.qcow2"], cwd: dir)
            #expect(check.succeeded && check.stdout.contains("No errors were found"), "\(check)")
            let cmp = try await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", "rw.qcow2", "expected.raw"], cwd: dir)
            #expect(cmp.succeeded && cmp.stdout.contains("Images are identical"), "\(cmp)")
        }
    }

    @Test("libnbd clients: full feature use, and kernel-like clients (simple replies, EXPORT_NAME fallback)")
    func libnbdClients() async throws {
        try await withTempDir("libnbd") { dir in
            try await makeFixture(in: dir)
            try await must("cp", ["top.qcow2", "rw.qcow2"], cwd: dir)
            try await withServer(["-A", "-e", "8", "--discard=unmap"], image: "rw.qcow2", dir: dir) { server in
                let full = try await runPython(libnbdFullScript, [server.uri], dir: dir)
                #expect(full.succeeded && full.stdout.contains("FULL OK"), "\(full)")
                let port = try #require(server.port)
                let kernel = try await runPython(kernelLikeScript, [String(port)], dir: dir)
                #expect(kernel.succeeded && kernel.stdout.contains("KERNEL OK"), "\(kernel)")
                let concurrent = try await runPython(concurrentScript, [server.uri], dir: dir)
                #expect(concurrent.succeeded && concurrent.stdout.contains("CONCURRENT OK"), "\(concurrent)")
            }
            let check = try await run("qemu-img", ["check", "rw.qcow2"], cwd: dir)
            #expect(check.succeeded && check.stdout.contains("No errors were found"), "\(check)")
        }
    }

    /// Regression test for an engine bug fixed in cd832b7: after an allocating partial-cluster
    /// write while the chain-index region was cached, the rest of the new cluster stayed
    /// "unallocated" in the cache, so later in-place writes there read back as zeros.
    @Test("Partial-cluster writes into a cluster allocated while its region was cached read back")
    func partialClusterWrites() async throws {
        try await withTempDir("partial") { dir in
            try await must("qemu-img", ["create", "-q", "-f", "qcow2", "p.qcow2", "64M"], cwd: dir)
            try await withServer([], image: "p.qcow2", dir: dir) { server in
                let commands = ["read 0 4k", "write -P 1 8M 4k", "write -P 2 8204k 4k", "read -P 1 8M 4k", "read -P 2 8204k 4k"]
                let r = try await run("qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [server.uri], cwd: dir)
                #expect(r.succeeded && !r.stdout.contains("Pattern verification failed"), "\(r)")
            }
            // On disk the data is right.
            let r = try await run("qemu-io", ["-r", "-f", "qcow2", "-c", "read -P 2 8204k 4k", "p.qcow2"], cwd: dir)
            #expect(r.succeeded && !r.stdout.contains("failed"), "\(r)")
        }
    }

    @Test("--detect-zeroes turns zero payloads into zero clusters; raw images are served too")
    func detectZeroesAndRaw() async throws {
        try await withTempDir("zeroes") { dir in
            for mode in ["off", "on", "unmap"] {
                let image = "z-\(mode).qcow2"
                try await must("qemu-img", ["create", "-q", "-f", "qcow2", image, "16M"], cwd: dir)
                try await must("qemu-io", ["-f", "qcow2", "-c", "write -P 0xaa 0 4M", image], cwd: dir)
                let discard = mode == "unmap" ? "unmap" : "ignore"
                try await withServer(["--detect-zeroes=\(mode)", "--discard=\(discard)"], image: image, dir: dir) { server in
                    let w = try await run("qemu-io", ["-f", "raw", "-c", "write -P 0 0 1M", "-c", "read -P 0 0 1M",
                                                      "-c", "read -P 0xaa 1M 3M", server.uri], cwd: dir)
                    #expect(w.succeeded && !w.stdout.contains("failed"), "\(w)")
                }
                let map = try await must("qemu-img", ["map", "--output=json", image], cwd: dir)
                let first = try #require((try JSONSerialization.jsonObject(with: Data(map.utf8)) as? [[String: Any]])?.first)
                if mode != "off" { #expect((first["length"] as? NSNumber)?.intValue == 1 << 20, "\(mode): \(map)") }
                #expect(first["data"] as? Bool == (mode == "off"), "\(mode): \(map)")
                #expect(first["zero"] as? Bool == (mode != "off"), "\(mode): \(map)")
                let check = try await run("qemu-img", ["check", image], cwd: dir)
                #expect(check.succeeded, "\(check)")
            }
            // A raw image: writes, zero writes, trims; compare with the same commands on a copy.
            try await must("qemu-img", ["create", "-q", "-f", "raw", "r.img", "8M"], cwd: dir)
            try await must("qemu-io", ["-f", "raw", "-c", "write -P 0x5c 0 8M", "r.img"], cwd: dir)
            try await must("cp", ["r.img", "expected.img"], cwd: dir)
            let commands = ["write -P 0x11 4097 3000", "write -z 1M 1M", "write -z -u 2M 64K", "discard 3M 1M", "flush"]
            try await withServer(["-f", "raw", "--discard=unmap"], image: "r.img", dir: dir) { server in
                let info = try await must("nbdinfo", ["--json", server.uri], cwd: dir)
                #expect(info.contains("\"export-size\": 8388608"), "\(info)")
                let w = try await run("qemu-io", ["-f", "raw"] + commands.dropLast().flatMap { ["-c", $0] } + ["-c", "flush", server.uri], cwd: dir)
                #expect(w.succeeded && !w.stdout.contains("failed"), "\(w)")
            }
            try await must("qemu-io", ["-f", "raw"] + commands.flatMap { ["-c", $0] } + ["expected.img"], cwd: dir)
            let cmp = try await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", "r.img", "expected.img"], cwd: dir)
            #expect(cmp.succeeded, "\(cmp)")
        }
    }

    @Test("fio (nbd engine, randrw) completes without errors")
    func fio() async throws {
        guard toolExists("fio") else {
            Issue.record("fio is not installed; skipping the fio run")
            return
        }
        try await withTempDir("fio") { dir in
            try await must("qemu-img", ["create", "-q", "-f", "qcow2", "fio.qcow2", "64M"], cwd: dir)
            try await withServer(["-e", "4", "-t"], image: "fio.qcow2", dir: dir) { server in
                let r = try await run("fio", ["--name=nbdtest", "--ioengine=nbd", "--uri=\(server.uri)", "--rw=randrw",
                                              "--bs=4k", "--size=16M", "--offset=16M", "--iodepth=8", "--runtime=3",
                                              "--time_based", "--verify=0", "--output-format=terse", "--terse-version=3"],
                                      cwd: dir, timeout: 60)
                #expect(r.succeeded, "\(r)")
                let fields = r.stdout.split(separator: "\n").last.map { $0.split(separator: ";", omittingEmptySubsequences: false) } ?? []
                // Terse v3: field 5 is the error count.
                #expect(fields.count > 10 && fields[4] == "0", "\(r)")
                #expect(server.isAlive)
            }
            let check = try await run("qemu-img", ["check", "fio.qcow2"], cwd: dir)
            #expect(check.succeeded, "\(check)")
        }
    }

    @Test("--snapshot writes to a temporary overlay and leaves the image untouched")
    func snapshotOverlay() async throws {
        try await withTempDir("snap") { dir in
            try await makeFixture(in: dir)
            let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/top.qcow2"))
            try await withServer(["--snapshot", "-e", "2"], image: "top.qcow2", dir: dir) { server in
                let w = try await run("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M", server.uri], cwd: dir)
                #expect(w.succeeded && !w.stdout.contains("failed"), "\(w)")
                let again = try await run("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x77 0 1M", "-c", "read -P 0xcc 1M 512K", server.uri], cwd: dir)
                #expect(again.succeeded && !again.stdout.contains("failed"), "\(again)")
            }
            let after = try Data(contentsOf: URL(fileURLWithPath: dir + "/top.qcow2"))
            #expect(before == after, "the image changed under --snapshot")
            let check = try await run("qemu-img", ["check", "top.qcow2"], cwd: dir)
            #expect(check.succeeded, "\(check)")
        }
    }

    @Test("-l exports an internal snapshot read-only")
    func internalSnapshot() async throws {
        try await withTempDir("intsnap") { dir in
            try await must("qemu-img", ["create", "-q", "-f", "qcow2", "s.qcow2", "16M"], cwd: dir)
            try await must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x41 0 1M", "s.qcow2"], cwd: dir)
            try await must("qemu-img", ["snapshot", "-c", "snap1", "s.qcow2"], cwd: dir)
            try await must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 0 1M", "s.qcow2"], cwd: dir)
            try await withServer(["-l", "snap1"], image: "s.qcow2", dir: dir) { server in
                let r = try await run("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x41 0 1M", server.uri], cwd: dir)
                #expect(r.succeeded && !r.stdout.contains("failed"), "\(r)")
                let ro = try await run("nbdinfo", ["--is", "read-only", server.uri], cwd: dir)
                #expect(ro.status == 0, "\(ro)")
            }
            try await withServer(["-r"], image: "s.qcow2", dir: dir) { server in
                let r = try await run("qemu-io", ["-r", "-f", "raw", "-c", "read -P 0x42 0 1M", server.uri], cwd: dir)
                #expect(r.succeeded && !r.stdout.contains("failed"), "\(r)")
            }
            let missing = try await run(QCOW2Binary.path, ["serve", "-l", "nope", "-k", dir + "/x.sock", "s.qcow2"], cwd: dir)
            #expect(missing.status == 1 && !missing.stderr.isEmpty, "\(missing)")
        }
    }

    @Test("Without --persistent the server exits after the last client; with it, it keeps serving")
    func lifecycle() async throws {
        try await withTempDir("life") { dir in
            try await makeFixture(in: dir)
            let server = try await startServer(["-r", "-e", "2"], image: "top.qcow2", dir: dir, persistent: false)
            #expect(server.isAlive)
            try await must("nbdinfo", ["--size", server.uri], cwd: dir)
            let exited = await server.waitForExit()
            #expect(exited, "server still running after its only client left")
            if !exited { await server.stop() }

            try await withServer(["-r", "-t"], image: "top.qcow2", listen: .unix, dir: dir) { server in
                for _ in 0..<3 { try await must("nbdinfo", ["--size", server.uri], cwd: dir) }
                try await Task.sleep(for: .milliseconds(200))
                #expect(server.isAlive)
            }
            // The socket file is removed on exit.
            let leftovers = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".sock") || $0.hasSuffix(".pid") }
            #expect(leftovers.isEmpty, "\(leftovers)")
        }
    }

    @Test("--shared 1 serves clients one after another (the second waits in the backlog)")
    func sharedLimit() async throws {
        try await withTempDir("shared") { dir in
            try await makeFixture(in: dir)
            try await withServer(["-r", "-t"], image: "top.qcow2", listen: .unix, dir: dir) { server in
                // A second client connects while the first holds the only slot: its handshake
                // completes only once the first has left.
                let r = try await runPython(holdScript, [server.uri, "0.6"], dir: dir)
                #expect(r.succeeded && r.stdout.contains("HOLD OK"), "\(r)")
            }
        }
    }
}

// MARK: - Python clients

/// Every command through libnbd, with both metadata contexts.
let libnbdFullScript = #"""
import nbd, sys
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.add_meta_context("qemu:allocation-depth")
h.connect_uri(sys.argv[1])
assert h.get_size() == 64 << 20
assert h.get_protocol() == "newstyle-fixed"
assert h.get_structured_replies_negotiated()
caps = (h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_fast_zero(), h.can_df(),
        h.can_multi_conn(), h.can_cache(), h.is_read_only(), h.can_meta_context("qemu:allocation-depth"))
assert caps == (True, True, True, True, True, True, True, True, False, True), caps
assert [h.get_block_size(x) for x in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)] == [1, 4096, 33554432]
assert h.pread(4096, 0) == b"\xaa" * 4096
assert h.pread(4096, 512 << 10) == b"\xcc" * 4096
# A read straddling data and a hole, and a DF read of the same range.
buf = h.pread(2 << 20, 1 << 20)
assert buf[: 512 << 10] == b"\xcc" * (512 << 10) and buf[512 << 10 :] == bytes((2 << 20) - (512 << 10))
chunks = []
def chunk(sub, offset, status, err):
    chunks.append((offset, len(sub), status))
    return 0
df = h.pread_structured(2 << 20, 1 << 20, chunk, nbd.CMD_FLAG_DF)
assert df == buf and chunks == [(1 << 20, 2 << 20, nbd.READ_DATA)], chunks
chunks.clear()
assert h.pread_structured(2 << 20, 1 << 20, chunk) == buf
assert chunks == [(1 << 20, 512 << 10, nbd.READ_DATA), ((3 << 19), (3 << 19), nbd.READ_HOLE)], chunks
# Unaligned I/O.
h.pwrite(b"\x5a" * 1000, (48 << 20) + 3, nbd.CMD_FLAG_FUA)
assert h.pread(1006, (48 << 20)) == b"\0" * 3 + b"\x5a" * 1000 + b"\0" * 3
h.zero(1 << 20, 49 << 20)
h.zero(1 << 20, 49 << 20, nbd.CMD_FLAG_NO_HOLE)
h.zero(1 << 20, 49 << 20, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(1 << 20, 49 << 20) == bytes(1 << 20)
# FAST_ZERO over a partial cluster holding data must fail fast with ENOTSUP.
h.pwrite(b"\x01" * 65536, 52 << 20)
try:
    h.zero(4096, (52 << 20) + 4096, nbd.CMD_FLAG_FAST_ZERO)
    raise SystemExit("fast zero over partial data cluster succeeded")
except nbd.Error as e:
    assert e.errnum == 95, e
assert h.pread(65536, 52 << 20) == b"\x01" * 65536
h.trim(1 << 20, 50 << 20)
assert h.pread(1 << 20, 50 << 20) == bytes(1 << 20)
h.cache(1 << 20, 0)
h.flush()
seen = {}
def cb(ctx, offset, entries, err):
    seen.setdefault(ctx, []).append((offset, list(entries)))
    return 0
h.block_status(16 << 20, 0, cb)
base = seen["base:allocation"][0][1]
depth = seen["qemu:allocation-depth"][0][1]
assert base[:4] == [1572864, 0, 6815744, 3], base
assert depth[:6] == [524288, 2, 1048576, 1, 6815744, 0], depth
seen.clear()
h.block_status(64 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert seen["base:allocation"][0][1] == [1572864, 0], seen
assert seen["qemu:allocation-depth"][0][1] == [524288, 2], seen
seen.clear()
h.block_status(4096, 600 << 10, cb, nbd.CMD_FLAG_REQ_ONE)
assert seen["base:allocation"][0][1] == [4096, 0], seen
# Errors keep the connection usable.
for f in (lambda: h.pread(4096, (64 << 20) - 2048), lambda: h.pwrite(b"x" * 4096, 64 << 20),
          lambda: h.trim(4096, 64 << 20), lambda: h.zero(4096, (64 << 20) - 1)):
    try:
        f()
        raise SystemExit("out-of-range request succeeded")
    except nbd.Error as e:
        assert e.errnum in (22, 28), e
assert h.pread(4096, 0) == b"\xaa" * 4096
h.shutdown()
print("FULL OK")
"""#

/// The kernel client's wire behaviour: no structured replies; NBD_OPT_GO without info
/// requests, or no fixed newstyle at all (NBD_OPT_EXPORT_NAME).
let kernelLikeScript = #"""
import nbd, sys
port = sys.argv[1]
# 1. EXPORT_NAME (no fixed newstyle), simple replies.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_handshake_flags(nbd.HANDSHAKE_FLAG_NO_ZEROES)
h.set_export_name("disk")
h.connect_tcp("127.0.0.1", port)
assert h.get_protocol() == "newstyle", h.get_protocol()
assert not h.get_structured_replies_negotiated()
assert h.pread(4, 0) == b"\xaa" * 4
assert not h.can_df()
h.pwrite(b"\x66" * 4096, 56 << 20)
assert h.pread(8192, (56 << 20) - 4096) == bytes(4096) + b"\x66" * 4096
try:
    h.pread(4096, 64 << 20)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == 22, e
assert h.pread(512, 0) == b"\xaa" * 512
h.shutdown()
# 2. EXPORT_NAME without NO_ZEROES (the 124 zero bytes follow the export info).
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_handshake_flags(0)
h.set_export_name("disk")
h.connect_tcp("127.0.0.1", port)
assert h.pread(4, 0) == b"\xaa" * 4
h.shutdown()
# 3. Fixed newstyle, NBD_OPT_GO, simple replies, with the empty (default) export name.
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_request_block_size(False)
h.set_export_name("")
h.connect_tcp("127.0.0.1", port)
assert h.get_protocol() == "newstyle-fixed"
assert h.pread(1 << 20, 0)[:4] == b"\xaa" * 4
h.flush()
h.shutdown()
# 4. Unknown export: GO fails.
h = nbd.NBD()
h.set_export_name("nope")
try:
    h.connect_tcp("127.0.0.1", port)
    raise SystemExit("unknown export accepted")
except nbd.Error:
    pass
print("KERNEL OK")
"""#

/// Many requests in flight at once (replies arrive in any order), verified by content.
let concurrentScript = #"""
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
base = 20 << 20
n = 64
bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536) for i in range(n)]
cookies = [h.aio_pwrite(bufs[i], base + i * 65536) for i in range(n)]
# 4 KiB writes, several per cluster, racing with reads of the same clusters.
small = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 4096) for i in range(n)]
for i in range(n):
    cookies.append(h.aio_pwrite(small[i], (28 << 20) + i * 12288))
    cookies.append(h.aio_pread(nbd.Buffer(4096), (28 << 20) + i * 12288 + 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(n):
    assert h.pread(4096, (28 << 20) + i * 12288) == bytes([i + 1]) * 4096, i
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
reads = [nbd.Buffer(65536) for i in range(n)]
cookies = [h.aio_pread(reads[i], base + i * 65536) for i in range(n)]
cookies += [h.aio_pread(nbd.Buffer(4096), 0) for i in range(32)]
cookies.append(h.aio_flush())
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for i in range(n):
    assert reads[i].to_bytearray() == bytearray([i + 1]) * 65536, i
h.shutdown()
print("CONCURRENT OK")
"""#

/// Holds one connection for argv[2] seconds while a second client connects from a thread;
/// the second handshake must wait until the first connection is closed.
let holdScript = #"""
import nbd, sys, threading, time
uri, hold = sys.argv[1], float(sys.argv[2])
first = nbd.NBD()
first.connect_uri(uri)
first.pread(4096, 0)
result = {}
def second():
    t = time.time()
    h = nbd.NBD()
    h.connect_uri(uri)
    result["waited"] = time.time() - t
    h.pread(4096, 0)
    h.shutdown()
thread = threading.Thread(target=second)
thread.start()
time.sleep(hold)
first.shutdown()
thread.join(30)
assert "waited" in result, "second client never connected"
assert result["waited"] >= hold * 0.7, result
print("HOLD OK", "%.3f" % result["waited"])
"""#
