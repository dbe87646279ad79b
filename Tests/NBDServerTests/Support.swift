import Foundation
import Subprocess
import Testing

#if canImport(Glibc)
import Glibc
#endif

// Plumbing for the NBD interop suites: temp dirs, running real tools under a timeout,
// starting `qcow2 serve` (daemonised with --fork/--pid-file) and stopping it by PID.

// MARK: - Running tools

struct ToolResult: Sendable, CustomStringConvertible {
    var command: String
    var status: Int32?
    var signal: Int32?
    var stdout: String
    var stderr: String
    var timeLimit: Int

    var timedOut: Bool { status == 124 || status == 137 }
    var succeeded: Bool { status == 0 }

    var description: String {
        let how = signal.map { "signal \($0)" } ?? "exit \(status.map(String.init) ?? "?")"
        return "`\(command)` → \(how)\(timedOut ? " (TIMED OUT after \(timeLimit) s)" : "")\n"
            + "stdout: \(stdout.prefix(3000))\nstderr: \(stderr.prefix(3000))"
    }
}

struct ToolFailure: Error, CustomStringConvertible {
    var result: ToolResult
    var description: String { "command failed: \(result)" }
}

/// Runs `tool` with `args` in `cwd` under `timeout -k 5 <seconds>`.
func run(_ tool: String, _ args: [String], cwd: String, timeout seconds: Int = 30) async throws -> ToolResult {
    let command = ([tool] + args).map(shellQuote).joined(separator: " ")
    let result = try await Subprocess.run(
        .name("timeout"),
        arguments: Arguments(["-k", "5", String(seconds), tool] + args),
        workingDirectory: .init(cwd),
        output: .string(limit: 64 << 20),
        error: .string(limit: 64 << 20))
    var status: Int32?
    var signal: Int32?
    switch result.terminationStatus {
    case .exited(let code): status = code
    case .signaled(let sig): signal = sig
    }
    return ToolResult(command: command, status: status, signal: signal, stdout: result.standardOutput,
                      stderr: result.standardError, timeLimit: seconds)
}

/// Runs a command that must succeed; returns its stdout.
@discardableResult
func must(_ tool: String, _ args: [String], cwd: String, timeout: Int = 60,
          sourceLocation: SourceLocation = #_sourceLocation) async throws -> String {
    let r = try await run(tool, args, cwd: cwd, timeout: timeout)
    guard r.succeeded else { throw ToolFailure(result: r) }
    return r.stdout
}

func shellQuote(_ s: String) -> String {
    if !s.isEmpty, s.allSatisfy({ $0.isLetter || $0.isNumber || "-_./=:,+@%".contains($0) }) { return s }
    return "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'"
}

/// The system Python, which has the libnbd binding (`import nbd`).
let python = "/usr/bin/python3"

/// Runs a Python script (written to `dir`) with arguments.
func runPython(_ script: String, _ args: [String], dir: String, timeout: Int = 60) async throws -> ToolResult {
    let path = dir + "/script-\(UUID().uuidString.prefix(8)).py"
    try script.write(toFile: path, atomically: true, encoding: .utf8)
    return try await run(python, [path] + args, cwd: dir, timeout: timeout)
}

func toolExists(_ name: String) -> Bool {
    let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
    return path.split(separator: ":").contains { FileManager.default.isExecutableFile(atPath: "\($0)/\(name)") }
}

// MARK: - Our binary

enum QCOW2Binary {
    /// `$QCOW2_BIN`, else `<package root>/.build/debug/qcow2`.
    static let path: String = {
        if let p = ProcessInfo.processInfo.environment["QCOW2_BIN"], !p.isEmpty { return p }
        var url = URL(fileURLWithPath: #filePath)  // <root>/Tests/NBDServerTests/Support.swift
        for _ in 0..<3 { url.deleteLastPathComponent() }
        return url.path + "/.build/debug/qcow2"
    }()

    static func require() throws {
        try #require(FileManager.default.isExecutableFile(atPath: path),
                     "qcow2 binary not found at \(path); run `swift build` or set QCOW2_BIN")
    }
}

// MARK: - Servers

/// A `qcow2 serve` (or `qemu-nbd`) process started with --fork and --pid-file.
struct ServerProcess: Sendable {
    var pid: pid_t
    /// Client URI of the export.
    var uri: String
    /// TCP port, or nil for a Unix socket.
    var port: Int?
    var socket: String?

    var isAlive: Bool { processAlive(pid) }

    /// SIGTERM, then wait (up to 10 s) for the process to go; SIGKILL as a last resort.
    func stop() async {
        kill(pid, SIGTERM)
        for _ in 0..<200 {
            if !processAlive(pid) { return }
            try? await Task.sleep(for: .milliseconds(50))
        }
        kill(pid, SIGKILL)
    }

    /// Waits until the process exits by itself; false on timeout.
    func waitForExit(seconds: Double = 10) async -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if !processAlive(pid) { return true }
            try? await Task.sleep(for: .milliseconds(50))
        }
        return false
    }
}

/// True while `pid` exists and is not a zombie (a daemon's parent has exited, so nobody
/// may reap it).
func processAlive(_ pid: pid_t) -> Bool {
    guard kill(pid, 0) == 0 else { return false }
    guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return false }
    guard let close = stat.lastIndex(of: ")") else { return true }
    let state = stat[stat.index(close, offsetBy: 2)...].prefix(1)
    return state != "Z" && state != "X"
}

/// Resident memory of a process in KiB.
func residentKiB(_ pid: pid_t) -> Int? {
    guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in status.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ").dropFirst().first ?? "")
    }
    return nil
}

/// A currently free loopback TCP port (bound to port 0, then released).
func freePort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw POSIXError(.EIO) }
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_port = 0
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let ok = withUnsafeMutablePointer(to: &addr) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
            bind(fd, sa, len) == 0 && getsockname(fd, sa, &len) == 0
        }
    }
    guard ok else { throw POSIXError(.EADDRINUSE) }
    return Int(UInt16(bigEndian: addr.sin_port))
}

enum Listen {
    case tcp
    case unix
}

/// Starts `qcow2 serve ARGS IMAGE` (or `qemu-nbd` with `qemu: true`) in the background on a
/// fresh loopback port or a Unix socket in `dir`, exporting `name`.
func startServer(_ args: [String], image: String, name: String = "disk", listen: Listen = .tcp, dir: String,
                 qemu: Bool = false, persistent: Bool = true) async throws -> ServerProcess {
    if !qemu { try QCOW2Binary.require() }
    let tag = UUID().uuidString.prefix(8)
    let pidFile = "\(dir)/server-\(tag).pid"
    var lastFailure: ToolResult?
    for _ in 0..<4 {
        var listenArgs: [String]
        var uri: String
        var port: Int?
        var socketPath: String?
        switch listen {
        case .tcp:
            let p = try freePort()
            port = p
            listenArgs = ["-b", "127.0.0.1", "-p", String(p)]
            uri = "nbd://127.0.0.1:\(p)/\(name)"
        case .unix:
            let s = "\(dir)/nbd-\(tag).sock"
            socketPath = s
            listenArgs = ["-k", s]
            uri = "nbd+unix:///\(name)?socket=\(s)"
        }
        let tool = qemu ? "qemu-nbd" : QCOW2Binary.path
        let all = (qemu ? [] : ["serve"]) + listenArgs + ["-x", name, "--fork", "--pid-file=\(pidFile)"]
            + (persistent && !args.contains("-t") ? ["-t"] : []) + args + [image]
        let r = try await run(tool, all, cwd: dir, timeout: 30)
        if r.succeeded {
            let text = try String(contentsOfFile: pidFile, encoding: .utf8)
            let pid = try #require(pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), "bad pid file: \(text)")
            return ServerProcess(pid: pid, uri: uri, port: port, socket: socketPath)
        }
        lastFailure = r
        // A port taken between freePort() and bind(): try another one.
        guard listen == .tcp, r.stderr.lowercased().contains("address") else { break }
    }
    throw ToolFailure(result: lastFailure!)
}

/// Runs `body` with a started server and always stops it afterwards.
func withServer<T>(_ args: [String], image: String, name: String = "disk", listen: Listen = .tcp, dir: String,
                   qemu: Bool = false, _ body: (ServerProcess) async throws -> T) async throws -> T {
    let server = try await startServer(args, image: image, name: name, listen: listen, dir: dir, qemu: qemu)
    do {
        let value = try await body(server)
        await server.stop()
        return value
    } catch {
        await server.stop()
        throw error
    }
}

// MARK: - Temp dirs and fixtures

func withTempDir<T>(_ label: String = "nbd", _ body: (String) async throws -> T) async throws -> T {
    let url = FileManager.default.temporaryDirectory
        .appendingPathComponent("qcow2-nbd-\(label)-\(UUID().uuidString.prefix(8))")
    try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    defer {
        if ProcessInfo.processInfo.environment["QCOW2_KEEP_TMP"] == nil {
            try? FileManager.default.removeItem(at: url)
        }
    }
    return try await body(url.path)
}

/// The two-layer fixture of docs/nbd-protocol.md §10.2: base.qcow2 (64 MiB, data at 0 and
/// 8M) under top.qcow2 (data at 512K and 32M, a zeroed MiB at 16M).
func makeFixture(in dir: String) async throws {
    try await must("qemu-img", ["create", "-q", "-f", "qcow2", "base.qcow2", "64M"], cwd: dir)
    try await must("qemu-io", ["-f", "qcow2", "-c", "write -P 0xaa 0 1M", "-c", "write -P 0xbb 8M 1M", "base.qcow2"], cwd: dir)
    try await must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"], cwd: dir)
    try await must("qemu-io", ["-f", "qcow2", "-c", "write -P 0xcc 512K 1M", "-c", "write -z 16M 1M",
                               "-c", "write -P 0xdd 32M 64K", "top.qcow2"], cwd: dir)
}

/// A chain of `depth` qcow2 layers (layer-0 at the bottom, `chain.qcow2` on top, 32 MiB),
/// where layer i writes 64 KiB with pattern i at a layer-specific offset, some layers
/// overwrite lower data, and a few layers zero a range.
func makeDeepChain(depth: Int, in dir: String) async throws -> String {
    var previous: String?
    for i in 0..<depth {
        let name = i == depth - 1 ? "chain.qcow2" : "layer-\(i).qcow2"
        var args = ["create", "-q", "-f", "qcow2"]
        if let previous { args += ["-b", previous, "-F", "qcow2"] }
        args += [name, "32M"]
        try await must("qemu-img", args, cwd: dir)
        var commands: [String] = []
        if i % 3 == 0 { commands.append("write -P \(i % 250 + 1) \((i * 320) % (32 << 10))K 64K") }
        if i % 7 == 0 { commands.append("write -P \(i % 250 + 2) 0 4K") }
        if i % 11 == 5 { commands.append("write -z \((i * 640) % (30 << 10))K 128K") }
        if !commands.isEmpty {
            try await must("qemu-io", ["-f", "qcow2"] + commands.flatMap { ["-c", $0] } + [name], cwd: dir)
        }
        previous = name
    }
    return "chain.qcow2"
}
