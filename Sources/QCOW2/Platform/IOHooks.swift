#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// The test seam of the I/O layer (issue: reliability). Configured from the environment
/// once per process, so the CLI can be driven by tests without a special build:
///
/// - `QCOW2_IO_LOG=PATH` appends every write (path, offset, bytes) and every sync to a
///   binary log. A test replays any prefix consistent with the syncs onto a copy of the
///   original image to simulate a power cut (writes after the last completed sync may be
///   lost or reordered) and checks the result.
/// - `QCOW2_FAULT=OP:N:ERRNO[:MINOFFSET][,...]` makes the N-th (1-based) `OP` fail with
///   `ERRNO`, where OP is `read`, `write`, `sync` or `fallocate` and ERRNO is `EIO`,
///   `ENOSPC` or a number — like QEMU's blkdebug, to check that errors reach the caller and
///   leave a consistent image. With MINOFFSET only reads/writes at a file offset
///   ≥ MINOFFSET count: a server test aims at guest data clusters, whose host offsets it
///   knows, without depending on how many metadata reads opening the image takes. Each
///   fault counts on its own (under one lock, so a thread pool's order is the order the
///   operations reach this check).
///
/// Record format (big-endian): kind u8 (1 = write, 2 = sync), path length u16, path,
/// then for writes offset u64, length u32, bytes.
enum IOHooks {
    struct Fault {
        var op: String
        var nth: Int
        var errno: Int32
        /// Only operations at this file offset or beyond count (0: all).
        var minOffset: UInt64 = 0
    }

    private struct State {
        var logFD: CInt = -1
        var faults: [Fault] = []
        /// Matching operations seen so far, per entry of `faults`.
        var counts: [Int] = []
    }

    private static let state: Mutex<State> = {
        var s = State()
        if let path = getenv("QCOW2_IO_LOG").map({ String(cString: $0) }) {
            s.logFD = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        }
        if let spec = getenv("QCOW2_FAULT").map({ String(cString: $0) }) {
            for item in spec.split(separator: ",") {
                let parts = item.split(separator: ":").map(String.init)
                guard parts.count == 3 || parts.count == 4, let n = Int(parts[1]) else { continue }
                let minOffset = parts.count == 4 ? UInt64(parts[3]) ?? 0 : 0
                let code: Int32
                switch parts[2] {
                case "EIO": code = EIO
                case "ENOSPC": code = ENOSPC
                default: code = Int32(parts[2]) ?? EIO
                }
                s.faults.append(Fault(op: parts[0], nth: n, errno: code, minOffset: minOffset))
            }
            s.counts = [Int](repeating: 0, count: s.faults.count)
        }
        return Mutex(s)
    }()

    static let enabled: Bool = getenv("QCOW2_IO_LOG") != nil || getenv("QCOW2_FAULT") != nil

    /// Counts an operation (at file `offset`, for reads and writes); returns the errno to
    /// fail it with, if a fault is configured for it.
    static func fault(_ op: String, offset: UInt64 = 0) -> Int32? {
        guard enabled else { return nil }
        return state.withLock { s in
            var result: Int32?
            for i in s.faults.indices where s.faults[i].op == op && offset >= s.faults[i].minOffset {
                s.counts[i] += 1
                if s.counts[i] == s.faults[i].nth, result == nil { result = s.faults[i].errno }
            }
            return result
        }
    }

    static func logWrite(path: String, offset: UInt64, _ data: UnsafeRawBufferPointer) {
        guard enabled else { return }
        state.withLock { s in
            guard s.logFD >= 0 else { return }
            var record: [UInt8] = [1]
            let p = Array(path.utf8)
            record.append(UInt8(p.count >> 8)); record.append(UInt8(p.count & 0xFF))
            record.append(contentsOf: p)
            for shift in stride(from: 56, through: 0, by: -8) { record.append(UInt8(truncatingIfNeeded: offset >> UInt64(shift))) }
            let n = UInt32(data.count)
            for shift in stride(from: 24, through: 0, by: -8) { record.append(UInt8(truncatingIfNeeded: n >> UInt32(shift))) }
            record.append(contentsOf: data)
            _ = record.withUnsafeBytes { Glibc.write(s.logFD, $0.baseAddress, $0.count) }
        }
    }

    static func logSync(path: String) {
        guard enabled else { return }
        state.withLock { s in
            guard s.logFD >= 0 else { return }
            var record: [UInt8] = [2]
            let p = Array(path.utf8)
            record.append(UInt8(p.count >> 8)); record.append(UInt8(p.count & 0xFF))
            record.append(contentsOf: p)
            _ = record.withUnsafeBytes { Glibc.write(s.logFD, $0.baseAddress, $0.count) }
        }
    }
}
