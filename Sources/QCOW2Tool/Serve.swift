import ArgumentParser
import Dispatch
import NBDServer
import QCOW2
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `qcow2 serve`: export an image (and its backing chain) over NBD, like `qemu-nbd`.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Export an image over NBD (like qemu-nbd).",
        discussion: "Listens on 127.0.0.1:10809 by default, or on a Unix socket (--socket), or on a listening socket passed by the caller through systemd socket activation (LISTEN_PID/LISTEN_FDS, fd 3), so that `nbdinfo -- [ qcow2 serve IMAGE ]` works. Without --persistent the server exits when the last client disconnects.")

    @Option(name: .customShort("f"), help: ArgumentHelp("Image format (qcow2 or raw); detected when omitted.", valueName: "format"))
    var format: String?

    @Flag(name: [.customShort("r"), .customLong("read-only")], help: "Export read-only.")
    var readOnly = false

    @Option(name: [.customShort("x"), .customLong("export-name")], help: "Export name (default: empty, the default export).")
    var exportName = ""

    @Option(name: [.customShort("D"), .customLong("description")], help: "Export description.")
    var exportDescription: String?

    @Option(name: [.customShort("k"), .customLong("socket")], help: "Listen on this Unix socket instead of TCP.")
    var socket: String?

    @Option(name: [.customShort("b"), .customLong("bind")], help: "TCP address to listen on (default 127.0.0.1).")
    var bind: String?

    @Option(name: [.customShort("p"), .customLong("port")], help: "TCP port (default 10809).")
    var port: Int?

    @Flag(name: [.customShort("s"), .customLong("snapshot")], help: "Write to a temporary overlay; the image is left untouched.")
    var snapshot = false

    @Option(name: [.customShort("l"), .customLong("load-snapshot")], help: "Export an internal snapshot (read-only).")
    var loadSnapshot: String?

    @Option(name: [.customShort("e"), .customLong("shared")], help: "Clients served at once (0: unlimited); multi-conn is advertised when not 1.")
    var shared = 1

    @Flag(name: [.customShort("t"), .customLong("persistent")], help: "Keep running after the last client disconnects.")
    var persistent = false

    @Flag(name: [.customShort("A"), .customLong("allocation-depth")], help: "Offer the qemu:allocation-depth metadata context.")
    var allocationDepth = false

    @Option(name: .customLong("discard"), help: "ignore or unmap (also off/on): whether TRIM and zero writes may release clusters.")
    var discard: String = "ignore"

    private var discardMode: NBDExport.DiscardMode? {
        switch discard {
        case "off": return .ignore
        case "on": return .unmap
        default: return NBDExport.DiscardMode(rawValue: discard)
        }
    }

    @Option(name: .customLong("detect-zeroes"), help: "off, on or unmap: turn written zeros into zero writes.")
    var detectZeroes: String = "off"

    @Option(name: .customLong("pid-file"), help: "Write the server's PID to this file once it listens.")
    var pidFile: String?

    @Flag(name: .customLong("fork"), help: "Run in the background once listening.")
    var fork = false

    @Option(name: .customLong("handshake-limit"), help: "Seconds a client may take to finish the handshake (0: no limit).")
    var handshakeLimit = 10

    @Flag(name: [.customShort("v"), .customLong("verbose")], help: "Log connection errors and failed commands to stderr.")
    var verbose = false

    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image file.") var path: String

    func validate() throws {
        guard discardMode != nil else {
            throw ValidationError("--discard must be ignore or unmap")
        }
        guard NBDExport.DetectZeroes(rawValue: detectZeroes) != nil else {
            throw ValidationError("--detect-zeroes must be off, on or unmap")
        }
        if detectZeroes == "unmap" && discardMode != .unmap {
            throw ValidationError("--detect-zeroes=unmap requires --discard=unmap")
        }
        if socket != nil && (bind != nil || port != nil) {
            throw ValidationError("--socket cannot be combined with --bind or --port")
        }
        if let port, !(0...65535).contains(port) { throw ValidationError("invalid port \(port)") }
        guard shared >= 0 else { throw ValidationError("--shared must be 0 (unlimited) or more") }
        guard handshakeLimit >= 0 else { throw ValidationError("--handshake-limit must not be negative") }
        guard exportName.utf8.count <= 4096 else { throw ValidationError("export name longer than 4096 bytes") }
        if snapshot && loadSnapshot != nil { throw ValidationError("--snapshot and --load-snapshot cannot be combined") }
    }

    func run() throws {
        // Socket activation: the caller passed a listening socket as fd 3.
        let activated = Self.takeActivationSocket()
        if activated != nil && (socket != nil || bind != nil || port != nil) {
            printError("qcow2: --socket, --bind and --port cannot be used with socket activation")
            throw ExitCode(1)
        }
        let readyPipe = fork ? try Self.daemonize() : nil
        var cleanup = Cleanup()
        do {
            try serve(activated: activated, readyPipe: readyPipe, cleanup: &cleanup)
            cleanup.run()
        } catch let error as ExitCode {
            cleanup.run()
            throw error
        } catch {
            cleanup.run()
            printError("qcow2: \(error)")
            throw ExitCode(1)
        }
    }

    private func serve(activated: CInt?, readyPipe: CInt?, cleanup: inout Cleanup) throws {
        // Open the image (or a temporary overlay over it). An internal snapshot is read-only.
        let exportReadOnly = readOnly || loadSnapshot != nil
        var options = OpenOptions(format: format, writable: !exportReadOnly && !snapshot)
        options.snapshot = loadSnapshot
        let path = try secret.apply(self.path, to: &options)
        let image: DiskImage
        if snapshot {
            var baseOptions = OpenOptions(format: options.format)
            baseOptions.secrets = options.secrets
            let base = try DiskImage.open(path: path, options: baseOptions)
            let size = base.virtualSize
            let baseFormat = base.chain.first?.format ?? "raw"
            try base.close()
            let dir = try Self.makeTempDir()
            cleanup.directories.append(dir)
            let overlay = dir + "/overlay.qcow2"
            var create = CreateOptions(size: size)
            create.backingFile = Self.absolutePath(path)
            create.backingFormat = baseFormat
            try ImageCreator.create(path: overlay, options: create)
            let secrets = options.secrets
            options = OpenOptions(format: "qcow2", writable: !exportReadOnly)
            // The image's secrets move one layer down, under the plain overlay.
            options.secrets.fallback = secrets.fallback
            for (depth, s) in secrets.byDepth { options.secrets.byDepth[depth + 1] = s }
            image = try DiskImage.open(path: overlay, options: options)
        } else {
            image = try DiskImage.open(path: path, options: options)
        }
        cleanup.image = image

        var export = NBDExport(name: exportName, description: exportDescription, image: image, readOnly: exportReadOnly)
        export.discard = discardMode ?? .ignore
        export.detectZeroes = NBDExport.DetectZeroes(rawValue: detectZeroes) ?? .off
        export.allocationDepth = allocationDepth
        var config = NBDServer.Configuration(exports: [export])
        config.maxConnections = shared
        config.persistent = persistent
        config.limits.handshakeTimeout = handshakeLimit > 0 ? .seconds(Int64(handshakeLimit)) : nil
        if verbose { config.log = { printError("qcow2 serve: \($0)") } }

        let server = NBDServer(configuration: config)
        cleanup.server = server
        let endpoint: NBDServer.Endpoint
        if let activated {
            endpoint = .listeningSocket(activated)
        } else if let socket {
            endpoint = .unixSocket(path: socket)
            cleanup.files.append(socket)
        } else {
            endpoint = .tcp(host: bind ?? "127.0.0.1", port: port ?? 10809)
        }
        let address = try server.start(endpoint)
        if verbose { printError("qcow2 serve: listening on \(address?.description ?? "inherited socket")") }

        if let pidFile {
            try Self.writePIDFile(pidFile)
            cleanup.files.append(pidFile)
        }
        let signals = Self.installSignalHandlers { server.stop() }
        if let readyPipe {
            // Tell the waiting parent we are up, then detach from its stdio.
            var ok: UInt8 = 1
            _ = write(readyPipe, &ok, 1)
            close(readyPipe)
            Self.redirectStdioToDevNull()
        }
        try server.wait()
        signals.forEach { $0.cancel() }
    }

    /// What to undo on exit, in order: stop the server and drain its disk work, close the
    /// image, then remove temporary files, the socket and the PID file.
    struct Cleanup {
        var server: NBDServer?
        var image: DiskImage?
        var files: [String] = []
        var directories: [String] = []

        mutating func run() {
            if let server {
                server.stop()
                try? server.shutdown()
            }
            server = nil
            if let image {
                do { try image.close() } catch { printError("qcow2: \(error)") }
            }
            image = nil
            for f in files { unlink(f) }
            files = []
            for d in directories {
                if let entries = try? Self.list(d) {
                    for e in entries { unlink(d + "/" + e) }
                }
                rmdir(d)
            }
            directories = []
        }

        private static func list(_ dir: String) throws -> [String] {
            guard let d = opendir(dir) else { return [] }
            defer { closedir(d) }
            var names: [String] = []
            while let e = readdir(d) {
                let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                    String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
                }
                if name != "." && name != ".." { names.append(name) }
            }
            return names
        }
    }

    // MARK: Process plumbing

    /// fd 3 when `LISTEN_PID` is our PID and `LISTEN_FDS` ≥ 1 (systemd's protocol); the
    /// variables are removed so that children do not inherit them.
    static func takeActivationSocket() -> CInt? {
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
              let fdsText = getenv("LISTEN_FDS").map({ String(cString: $0) }),
              let pid = Int32(pidText), pid == getpid(), let count = Int(fdsText), count >= 1
        else { return nil }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        let fd: CInt = 3
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return fd
    }

    /// Forks: the parent waits until the child reports that it listens (exit 0) or fails
    /// (exit 1, the child printed the error); the child continues in a new session and
    /// gets the write end of the pipe.
    static func daemonize() throws -> CInt {
        var fds: [CInt] = [0, 0]
        guard pipe(&fds) == 0 else { throw ValidationError("pipe failed: \(String(cString: strerror(errno)))") }
        let pid = Glibc.fork()
        if pid < 0 { throw ValidationError("fork failed: \(String(cString: strerror(errno)))") }
        if pid > 0 {
            close(fds[1])
            var byte: UInt8 = 0
            var n: Int
            repeat { n = read(fds[0], &byte, 1) } while n < 0 && errno == EINTR
            throw ExitCode(n == 1 ? 0 : 1)
        }
        close(fds[0])
        _ = fcntl(fds[1], F_SETFD, FD_CLOEXEC)
        setsid()
        return fds[1]
    }

    static func redirectStdioToDevNull() {
        let null = open("/dev/null", O_RDWR)
        guard null >= 0 else { return }
        dup2(null, 0)
        dup2(null, 1)
        dup2(null, 2)
        if null > 2 { close(null) }
    }

    static func writePIDFile(_ path: String) throws {
        let text = "\(getpid())\n"
        let tmp = path + ".tmp\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ValidationError("cannot write PID file \(path): \(String(cString: strerror(errno)))") }
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
        // Appears atomically, complete: waiting scripts may read it as soon as it exists.
        guard rename(tmp, path) == 0 else {
            unlink(tmp)
            throw ValidationError("cannot write PID file \(path): \(String(cString: strerror(errno)))")
        }
    }

    static func installSignalHandlers(_ handler: @escaping @Sendable () -> Void) -> [any DispatchSourceSignal] {
        [SIGTERM, SIGINT, SIGHUP].map { sig in
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler(handler: handler)
            source.resume()
            return source
        }
    }

    static func makeTempDir() throws -> String {
        let base = getenv("TMPDIR").map { String(cString: $0) }.flatMap { $0.isEmpty ? nil : $0 } ?? "/var/tmp"
        var template = Array((base + "/qcow2-serve.XXXXXX").utf8CString)
        guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) != nil else {
            throw ValidationError("cannot create a temporary directory in \(base): \(String(cString: strerror(errno)))")
        }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func absolutePath(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return path }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) + "/" + path
    }
}
