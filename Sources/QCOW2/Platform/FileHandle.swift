#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CQCOW2System

/// The engine's only contact with the operating system: an owned file descriptor with
/// positional I/O, sync, preallocation/hole punching and OFD locks.
///
/// Keeping every syscall here lets macOS (or a fault-injecting test seam) follow by
/// replacing one file. The descriptor is closed on `deinit`; reads and writes are
/// positional, so one handle may be used from several threads at once.
public final class FileHandle: @unchecked Sendable {
    public let path: String
    public let fd: CInt
    public let writable: Bool

    /// Opens `path` read-only or read-write (never creates).
    public init(path: String, writable: Bool) throws {
        let flags = (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC
        let fd = path.withCString { Glibc.open($0, flags) }
        guard fd >= 0 else { throw QCOW2Error.io(path: path, operation: "open", errno: errno) }
        self.path = path
        self.fd = fd
        self.writable = writable
    }

    /// Creates (or truncates) a file for writing.
    public init(creating path: String, truncate: Bool = true) throws {
        let flags = O_RDWR | O_CREAT | O_CLOEXEC | (truncate ? O_TRUNC : 0)
        let fd = path.withCString { Glibc.open($0, flags, 0o644) }
        guard fd >= 0 else { throw QCOW2Error.io(path: path, operation: "create", errno: errno) }
        self.path = path
        self.fd = fd
        self.writable = true
    }

    deinit { _ = Glibc.close(fd) }

    /// The file's current length in bytes.
    public func size() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCOW2Error.io(path: path, operation: "fstat", errno: errno) }
        return UInt64(max(0, st.st_size))
    }

    /// Bytes the file occupies on disk (st_blocks × 512).
    public func allocatedSize() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCOW2Error.io(path: path, operation: "fstat", errno: errno) }
        return UInt64(max(0, st.st_blocks)) * 512
    }

    /// (device, inode): identifies the file for loop detection regardless of the path used.
    public func identity() throws -> FileIdentity {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw QCOW2Error.io(path: path, operation: "fstat", errno: errno) }
        return FileIdentity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    /// Reads exactly `buffer.count` bytes at `offset`; bytes past end-of-file read as zeros
    /// (as QEMU does: a qcow2 file may legitimately end inside a cluster).
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        guard offset <= UInt64(Int64.max) - UInt64(buffer.count) else {
            throw QCOW2Error.io(path: path, operation: "read at offset \(offset)", errno: EINVAL)
        }
        if let code = IOHooks.fault("read", offset: offset) { throw QCOW2Error.io(path: path, operation: "read at offset \(offset)", errno: code) }
        var done = 0
        while done < buffer.count {
            let n = pread(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw QCOW2Error.io(path: path, operation: "read at offset \(offset)", errno: errno)
            }
            if n == 0 { break }
            done += n
        }
        if done < buffer.count {
            (base + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
        }
    }

    /// Reads `count` bytes at `offset` into a new array (zero-filled past end-of-file).
    public func read(count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { (raw) in try read(into: raw, at: offset) }
        return out
    }

    /// Writes all of `buffer` at `offset`.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        if IOHooks.enabled {
            if let code = IOHooks.fault("write", offset: offset) { throw QCOW2Error.io(path: path, operation: "write at offset \(offset)", errno: code) }
            IOHooks.logWrite(path: path, offset: offset, buffer)
        }
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw QCOW2Error.io(path: path, operation: "write at offset \(offset)", errno: errno)
            }
            done += n
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { (raw) in try write(raw, at: offset) }
    }

    /// Makes written data durable (fdatasync).
    public func sync() throws {
        if let code = IOHooks.fault("sync") { throw QCOW2Error.io(path: path, operation: "fdatasync", errno: code) }
        #if os(Linux)
        let rc = fdatasync(fd)
        #else
        let rc = fsync(fd)
        #endif
        guard rc == 0 else { throw QCOW2Error.io(path: path, operation: "fdatasync", errno: errno) }
        IOHooks.logSync(path: path)
    }

    public func truncate(to length: UInt64) throws {
        guard ftruncate(fd, off_t(length)) == 0 else { throw QCOW2Error.io(path: path, operation: "ftruncate", errno: errno) }
    }

    /// Frees the blocks of a byte range; it then reads as zeros. Returns false when the
    /// file system cannot punch holes (the caller then writes zeros if it needs them).
    @discardableResult
    public func punchHole(at offset: UInt64, length: UInt64) -> Bool {
        let mode = cqcow2_FALLOC_FL_PUNCH_HOLE | cqcow2_FALLOC_FL_KEEP_SIZE
        return cqcow2_fallocate(fd, mode, Int64(offset), Int64(length)) == 0
    }

    /// Makes a byte range read as zeros without writing them (FALLOC_FL_ZERO_RANGE; blocks
    /// stay allocated). Returns false when the file system cannot do it.
    @discardableResult
    public func zeroRange(at offset: UInt64, length: UInt64) -> Bool {
        if IOHooks.enabled, IOHooks.fault("fallocate") != nil { return false }
        return cqcow2_fallocate(fd, cqcow2_FALLOC_FL_ZERO_RANGE | cqcow2_FALLOC_FL_KEEP_SIZE, Int64(offset), Int64(length)) == 0
    }

    /// Writes zeros over a byte range in bounded chunks (no allocation proportional to it).
    public func writeZeros(at offset: UInt64, length: UInt64) throws {
        let chunk = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
        var pos: UInt64 = 0
        while pos < length {
            let n = Int(min(UInt64(chunk.count), length - pos))
            try chunk.withUnsafeBytes { try write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: offset + pos) }
            pos += UInt64(n)
        }
    }

    /// Allocates blocks for a byte range (posix_fallocate semantics; extends the file).
    public func preallocate(at offset: UInt64, length: UInt64) throws {
        if let code = IOHooks.fault("fallocate") { throw QCOW2Error.io(path: path, operation: "fallocate", errno: code) }
        let rc = cqcow2_fallocate(fd, 0, Int64(offset), Int64(length))
        guard rc == 0 else { throw QCOW2Error.io(path: path, operation: "fallocate", errno: errno) }
    }

    /// Next data at or after `offset` (SEEK_DATA), or nil when only a hole remains.
    public func nextData(from offset: UInt64) -> UInt64? {
        let r = cqcow2_lseek_data(fd, Int64(offset))
        return r < 0 ? nil : UInt64(r)
    }

    /// Next hole at or after `offset` (SEEK_HOLE; end-of-file counts as a hole).
    public func nextHole(from offset: UInt64) -> UInt64? {
        let r = cqcow2_lseek_hole(fd, Int64(offset))
        return r < 0 ? nil : UInt64(r)
    }

    /// Takes an OFD lock on `[start, start+length)`; returns false when another open file
    /// description holds a conflicting lock.
    public func lock(exclusive: Bool, start: UInt64, length: UInt64) throws -> Bool {
        if cqcow2_ofd_lock(fd, exclusive ? 1 : 0, Int64(start), Int64(length)) == 0 { return true }
        if errno == EAGAIN || errno == EACCES { return false }
        throw QCOW2Error.io(path: path, operation: "lock", errno: errno)
    }
}

extension FileHandle {
    // QEMU's image locking (block/file-posix.c): one byte per permission at 100 + bit
    // ("I use it") and at 200 + bit ("I don't let others use it"), all as shared OFD locks;
    // conflicts are found by testing for locks held by other open file descriptions.
    private static let permConsistentRead: UInt64 = 0, permWrite: UInt64 = 1

    /// Takes QEMU-compatible image locks: a writer uses "write" and refuses other writers;
    /// a reader refuses writers. Fails with a clear message when another process (QEMU or
    /// us) holds a conflicting lock.
    public func lockImage(forWriting: Bool) throws {
        // A probe that fails counts as a conflict (as QEMU's qemu_lock_fd_test), rather than
        // letting two writers in.
        func conflict(_ byte: UInt64) -> Bool { cqcow2_ofd_test(fd, Int64(byte), 1) != 0 }
        if forWriting {
            if conflict(100 + Self.permWrite) || conflict(200 + Self.permWrite) || conflict(200 + Self.permConsistentRead) {
                throw QCOW2Error.unsupported(path: path, "Failed to get \"write\" lock: is another process using the image?")
            }
            for byte in [100 + Self.permConsistentRead, 100 + Self.permWrite, 200 + Self.permWrite] {
                _ = try lock(exclusive: false, start: byte, length: 1)
            }
        } else {
            if conflict(100 + Self.permWrite) {
                throw QCOW2Error.unsupported(path: path, "Failed to get shared \"write\" lock: is another process writing the image?")
            }
            for byte in [100 + Self.permConsistentRead, 200 + Self.permWrite] {
                _ = try lock(exclusive: false, start: byte, length: 1)
            }
        }
    }
}

extension FileHandle {
    /// Releases the image locks taken by `lockImage`.
    public func unlockImage() {
        _ = cqcow2_ofd_unlock(fd, 100, 200)
    }
}

/// Device and inode of an open file.
public struct FileIdentity: Hashable, Sendable {
    public let device: UInt64
    public let inode: UInt64
}

/// Path helpers (pure string manipulation, no I/O except `realPath`).
enum Paths {
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        let dir = String(path[..<slash])
        return dir.isEmpty ? "/" : dir
    }

    /// Resolves `name` relative to the directory of `base` (QEMU's rule for backing names).
    static func resolve(_ name: String, relativeTo base: String) -> String {
        if name.hasPrefix("/") { return name }
        let dir = directory(of: base)
        return dir == "." ? name : dir + "/" + name
    }

    static func realPath(_ path: String) -> String? {
        guard let p = path.withCString({ realpath($0, nil) }) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// Upper bound on simultaneously open files for this process (RLIMIT_NOFILE soft limit),
    /// after raising the soft limit to the hard limit as QEMU does at startup.
    static func openFileLimit() -> Int {
        var rl = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &rl) == 0 else { return 1024 }
        if rl.rlim_cur < rl.rlim_max {
            var raised = rl
            raised.rlim_cur = rl.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { rl = raised }
        }
        return Int(min(rl.rlim_cur, 1 << 20))
    }
}

func errnoDescription(_ code: CInt) -> String {
    guard let s = strerror(code) else { return "errno \(code)" }
    return String(cString: s)
}
