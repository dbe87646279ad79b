import ArgumentParser
import Dispatch
import QCOW2
#if canImport(Glibc)
import Glibc
#endif

/// `qcow2 io`: qemu-io style commands for scripts and tests. Output and pattern semantics
/// follow qemu-io, so a `qemu-io -c 'read -P …'` check and ours agree.
struct IO: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "io", abstract: "Run qemu-io style commands (read, write, discard, flush, map) on an image.")

    @Option(name: .customShort("f"), help: "Image format (qcow2 or raw).") var format: String?
    @Option(name: .customShort("c"), parsing: .singleValue, help: "A command; may be repeated.") var commands: [String] = []
    @Flag(name: .customShort("r"), help: "Open read-only.") var readOnly = false
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image file.") var path: String

    func run() throws {
        var failed = false
        try QCOW2Tool.guarded {
            var options = OpenOptions(format: format, writable: !readOnly)
            options.allowExternalDataFiles = true
            let path = try secret.apply(self.path, to: &options)
            let disk = try DiskImage.open(path: path, options: options)
            for command in commands {
                do {
                    if try !execute(command, disk) { failed = true }
                } catch {
                    print("\(command.split(separator: " ").first ?? "") failed: \(error)")
                    failed = true
                }
            }
            try disk.close()
        }
        if failed { throw ExitCode(1) }
    }

    /// Runs one command; returns false when it ran but reported a failure (pattern mismatch).
    private func execute(_ line: String, _ disk: DiskImage) throws -> Bool {
        var words = line.split(separator: " ").map(String.init)
        guard !words.isEmpty else { return true }
        let name = words.removeFirst()
        var pattern: UInt8?
        var zero = false, unmap = false, compressed = false
        var positional: [String] = []
        var i = 0
        while i < words.count {
            switch words[i] {
            case "-P":
                i += 1
                guard i < words.count, let p = parseNumber(words[i]), p <= 0xFF else {
                    throw ValidationError("\(i < words.count ? words[i] : "") is not a valid pattern byte")
                }
                pattern = UInt8(p)
            case "-z": zero = true
            case "-u": unmap = true
            case "-c": compressed = true
            case "-q", "-v", "-C", "-f", "-n": break
            default: positional.append(words[i])
            }
            i += 1
        }
        let start = DispatchTime.now().uptimeNanoseconds
        func range() throws -> (UInt64, UInt64) {
            guard positional.count == 2, let off = parseSize(positional[0]), let len = parseSize(positional[1]) else {
                throw ValidationError("\(name) needs OFFSET and LENGTH")
            }
            return (off, len)
        }
        switch name {
        case "read":
            let (off, len) = try range()
            var buffer = [UInt8](repeating: 0, count: Int(len))
            try buffer.withUnsafeMutableBytes { try disk.read(at: off, into: $0) }
            var ok = true
            if let pattern, let bad = buffer.firstIndex(where: { $0 != pattern }) {
                _ = bad
                print("Pattern verification failed at offset \(off), \(len) bytes")
                ok = false
            }
            report("read", off, len, start)
            return ok
        case "write":
            let (off, len) = try range()
            if unmap && !zero { throw ValidationError("-u requires -z to be specified") }
            if zero {
                try disk.writeZeroes(at: off, length: len, unmap: unmap)
            } else {
                let buffer = [UInt8](repeating: pattern ?? 0xCD, count: Int(len))
                if compressed {
                    let cs = disk.clusterSize
                    guard off % cs == 0 else { throw QCOW2Error.invalidArgument("Invalid argument") }
                    var pos = off
                    while pos < off + len {
                        let n = min(cs, off + len - pos, disk.virtualSize - pos)
                        try buffer.withUnsafeBytes { raw in
                            try disk.writeCompressed(at: pos, from: UnsafeRawBufferPointer(rebasing: raw[Int(pos - off)..<Int(pos - off + n)]))
                        }
                        pos += n
                    }
                } else {
                    try buffer.withUnsafeBytes { try disk.write(at: off, from: $0) }
                }
            }
            report("wrote", off, len, start)
        case "discard":
            let (off, len) = try range()
            try disk.discard(at: off, length: len)
            report("discard", off, len, start)
        case "flush":
            try disk.flush()
        case "sleep":
            guard let ms = positional.first.flatMap({ UInt32($0) }) else { throw ValidationError("sleep needs milliseconds") }
            usleep(ms * 1000)
        case "abort":
            // Simulate a crash, as qemu-io's `abort`: no flush, no close.
            fflush(nil)
            Glibc.abort()
        case "map":
            for e in try topMap(disk) {
                let what = e.allocated ? "    allocated" : "not allocated"
                print("\(qemuSize(e.length)) (0x\(String(e.length, radix: 16))) bytes \(what) at offset \(qemuSize(e.start)) (0x\(String(e.start, radix: 16)))")
            }
        default:
            throw ValidationError("unknown command '\(name)'")
        }
        return true
    }

    /// Allocation in the top layer only, merged, as qemu-io's `map` shows it.
    private func topMap(_ disk: DiskImage) throws -> [(start: UInt64, length: UInt64, allocated: Bool)] {
        var out: [(start: UInt64, length: UInt64, allocated: Bool)] = []
        for e in try disk.allocationMap(offset: 0, length: disk.virtualSize) {
            let allocated = e.present && e.depth == 0
            if let last = out.last, last.allocated == allocated {
                out[out.count - 1].length += e.length
            } else {
                out.append((e.start, e.length, allocated))
            }
        }
        return out
    }

    private func report(_ verb: String, _ off: UInt64, _ len: UInt64, _ start: UInt64) {
        let seconds = max(1e-9, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
        print("\(verb) \(len)/\(len) bytes at offset \(off)")
        let centis = Int(seconds * 100)
        print("\(qemuSize(len)), 1 ops; \(centis / 100 < 10 ? "0" : "")\(centis / 100).\(centis % 100 < 10 ? "0" : "")\(centis % 100) sec (\(qemuSize(UInt64(Double(len) / seconds)))/sec and \(Int(1 / seconds)) ops/sec)")
    }

    private func parseNumber(_ s: String) -> UInt64? {
        if s.hasPrefix("0x") || s.hasPrefix("0X") { return UInt64(s.dropFirst(2), radix: 16) }
        return UInt64(s)
    }
}

/// qemu-io's size formatting: "64 KiB", "3.812 MiB", "512 bytes".
func qemuSize(_ v: UInt64) -> String {
    if v < 1024 { return "\(v) bytes" }
    let units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var d = Double(v) / 1024
    var i = 0
    while d >= 1024 && i < units.count - 1 { d /= 1024; i += 1 }
    if d == d.rounded() { return "\(Int(d)) \(units[i])" }
    let scaled = (d * 1000).rounded() / 1000
    return "\(scaled) \(units[i])"
}
