import Foundation
import Testing

// I/O faults under a running server: `qcow2 serve` started with QCOW2_FAULT (the engine's
// seam, Sources/QCOW2/Platform/IOHooks.swift) fails one read, write or flush of a guest
// data cluster with EIO or ENOSPC. A real client (qemu-io over NBD) must see that request
// fail with the matching NBD error, the server must keep serving the same and a new
// connection, and afterwards the image must check clean with the acknowledged data in it.

/// Starts `qcow2 serve` on a Unix socket with `QCOW2_FAULT=fault` in its environment.
private func startFaultyServer(fault: String, image: String, dir: String) async throws -> ServerProcess {
    try QCOW2Binary.require()
    let tag = UUID().uuidString.prefix(8)
    let socket = "\(dir)/nbd-\(tag).sock", pidFile = "\(dir)/server-\(tag).pid"
    let r = try await run("env", ["QCOW2_FAULT=\(fault)", QCOW2Binary.path, "serve", "-k", socket, "-x", "disk",
                                  "--fork", "--pid-file=\(pidFile)", "-t", image], cwd: dir)
    guard r.succeeded else { throw ToolFailure(result: r) }
    let text = try String(contentsOfFile: pidFile, encoding: .utf8)
    let pid = try #require(pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)))
    return ServerProcess(pid: pid, uri: "nbd+unix:///disk?socket=\(socket)", port: nil, socket: socket)
}

/// Runs `body` against a server started with `fault`, then stops it (also when `body`
/// throws) and expects it to exit.
private func withFaultyServer(fault: String, dir: String, _ body: (ServerProcess) async throws -> Void) async throws {
    let server = try await startFaultyServer(fault: fault, image: "a.qcow2", dir: dir)
    do {
        try await body(server)
    } catch {
        await server.stop()
        throw error
    }
    await server.stop()
    #expect(await server.waitForExit())
}

/// A 1 MiB image whose every cluster is allocated (pattern 0x11), and the lowest host
/// offset of its data: every guest read or write lands at or beyond it, every metadata
/// access (header, tables) below it, so a fault with that MINOFFSET hits guest data only.
private func makeAllocatedImage(in dir: String) async throws -> UInt64 {
    try await must("qemu-img", ["create", "-q", "-f", "qcow2", "a.qcow2", "1M"], cwd: dir)
    try await must("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 1M", "a.qcow2"], cwd: dir)
    let map = try await must("qemu-img", ["map", "--output=json", "a.qcow2"], cwd: dir)
    let extents = try #require(try JSONSerialization.jsonObject(with: Data(map.utf8)) as? [[String: Any]])
    let offsets = extents.compactMap { ($0["offset"] as? NSNumber)?.uint64Value }
    return try #require(offsets.min())
}

/// qemu-io with `commands` against `uri` (raw over NBD); stdout + stderr.
private func qemuIO(_ commands: [String], uri: String, readOnly: Bool = false, dir: String) async throws -> String {
    let r = try await run("qemu-io", (readOnly ? ["-r"] : []) + ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri],
                          cwd: dir)
    #expect(!r.timedOut, "\(r)")
    return r.stdout + r.stderr
}

/// After the server is gone: `qemu-img check` finds no corruption (exit 0, or 3 = leaked
/// clusters only) and the acknowledged data reads back from the file itself.
private func expectConsistent(_ dir: String, reads: [String]) async throws {
    let check = try await run("qemu-img", ["check", "a.qcow2"], cwd: dir)
    #expect(check.status == 0 || check.status == 3, "\(check)")
    #expect(!check.stdout.contains("ERROR"), "\(check)")
    let r = try await run("qemu-io", ["-r", "-f", "qcow2"] + reads.flatMap { ["-c", $0] } + ["a.qcow2"], cwd: dir)
    #expect(r.succeeded && !(r.stdout + r.stderr).contains("failed"), "\(r)")
}

private func message(_ errno: String) -> String {
    errno == "ENOSPC" ? "No space left on device" : "Input/output error"
}

private func count(_ needle: String, in text: String) -> Int { text.components(separatedBy: needle).count - 1 }

@Suite("NBD server under injected I/O faults", .serialized)
struct FaultInjectionTests {
    @Test("a failing data write gets the matching NBD error; the server goes on; acked data survives",
          arguments: ["EIO", "ENOSPC"])
    func writeFault(errno: String) async throws {
        try await withTempDir("fault-write") { dir in
            let dataStart = try await makeAllocatedImage(in: dir)
            try await withFaultyServer(fault: "write:2:\(errno):\(dataStart)", dir: dir) { server in
                let out = try await qemuIO(["write -P 0x22 0 64k", "write -P 0x33 64k 64k", "write -P 0x44 128k 64k",
                                            "read -P 0x44 128k 64k", "read -P 0x22 0 64k"], uri: server.uri, dir: dir)
                #expect(count("write failed: \(message(errno))", in: out) == 1, "\(out)")
                #expect(count("failed", in: out) == 1, "only the faulted write may fail:\n\(out)")
                #expect(server.isAlive)
                let again = try await qemuIO(["read -P 0x22 0 64k", "read -P 0x44 128k 64k", "read -P 0x11 192k 64k",
                                              "write -P 0x66 64k 64k", "read -P 0x66 64k 64k"], uri: server.uri, dir: dir)
                #expect(!again.contains("failed"), "new connection after the fault:\n\(again)")
            }
            try await expectConsistent(dir, reads: ["read -P 0x22 0 64k", "read -P 0x66 64k 64k",
                                                    "read -P 0x44 128k 64k", "read -P 0x11 192k 832k"])
        }
    }

    @Test("a failing data read gets the matching NBD error; later reads and writes work", arguments: ["EIO", "ENOSPC"])
    func readFault(errno: String) async throws {
        try await withTempDir("fault-read") { dir in
            let dataStart = try await makeAllocatedImage(in: dir)
            try await withFaultyServer(fault: "read:2:\(errno):\(dataStart)", dir: dir) { server in
                let out = try await qemuIO(["read -P 0x11 0 64k", "read -P 0x11 64k 64k", "read -P 0x11 128k 64k",
                                            "write -P 0x55 192k 64k", "read -P 0x55 192k 64k"], uri: server.uri, dir: dir)
                #expect(count("read failed: \(message(errno))", in: out) == 1, "\(out)")
                #expect(count("failed", in: out) == 1, "only the faulted read may fail:\n\(out)")
                #expect(server.isAlive)
                let again = try await qemuIO(["read -P 0x11 64k 64k", "read -P 0x55 192k 64k"], uri: server.uri,
                                             readOnly: true, dir: dir)
                #expect(!again.contains("failed"), "new connection after the fault:\n\(again)")
            }
            try await expectConsistent(dir, reads: ["read -P 0x11 0 192k", "read -P 0x55 192k 64k", "read -P 0x11 256k 768k"])
        }
    }

    @Test("a failing flush (fdatasync) gets the matching NBD error; the next flush succeeds", arguments: ["EIO", "ENOSPC"])
    func flushFault(errno: String) async throws {
        try await withTempDir("fault-sync") { dir in
            _ = try await makeAllocatedImage(in: dir)
            // sync #1 is the first FLUSH: writes to allocated clusters do not sync, and
            // libnbd sends no FUA (qemu-io would: its writethrough default flushes every
            // write, and with -t writeback its `flush` does not report errors).
            try await withFaultyServer(fault: "sync:1:\(errno)", dir: dir) { server in
                let r = try await runPython(flushScript, [server.uri], dir: dir)
                #expect(r.succeeded, "\(r)")
                #expect(r.stdout.split(separator: "\n") == [
                    "flush 1: \(errno)", "flush 2: ok", "flush 3: ok", "read back: ok", "new connection: ok",
                ], "\(r)")
                #expect(server.isAlive)
            }
            try await expectConsistent(dir, reads: ["read -P 0x22 0 64k", "read -P 0x33 64k 64k", "read -P 0x44 128k 64k"])
        }
    }
}

/// libnbd: write, three flushes (printing each one's outcome), read back; then the same
/// on a second connection.
private let flushScript = """
import errno, sys, nbd
def connect():
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    return h
h = connect()
h.pwrite(b"\\x22" * 65536, 0)
for i in (1, 2, 3):
    try:
        h.flush()
        print("flush %d: ok" % i)
    except nbd.Error as e:
        print("flush %d: %s" % (i, errno.errorcode.get(e.errno, e.errno)))
    if i == 1:
        h.pwrite(b"\\x33" * 65536, 65536)
ok = h.pread(65536, 0) == b"\\x22" * 65536 and h.pread(65536, 65536) == b"\\x33" * 65536
print("read back: %s" % ("ok" if ok else "MISMATCH"))
h.shutdown()
h = connect()
h.pwrite(b"\\x44" * 65536, 131072)
h.flush()
print("new connection: %s" % ("ok" if h.pread(65536, 131072) == b"\\x44" * 65536 else "MISMATCH"))
h.shutdown()
"""
