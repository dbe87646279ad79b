import ArgumentParser
import Dispatch
import QCOW2
import Synchronization

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read benchmark shaped like qemu-img bench (same -c/-s/-S/-o/-d meaning).")

    @OptionGroup var image: ImageOptions
    @Option(name: .customShort("c"), help: "Number of requests.") var count: Int = 75000
    @Option(name: .customShort("s"), help: "Request size (default 4k).") var size: String = "4k"
    @Option(name: .customShort("S"), help: "Step between request offsets (default: the request size).") var step: String?
    @Option(name: .customShort("o"), help: "Offset of the first request.") var offset: String = "0"
    @Option(name: .customShort("d"), help: "Requests in flight (reported; threads do the work).") var depth: Int = 64
    @Option(name: .customShort("t"), help: "Worker threads (default 1).") var threads: Int = 1
    @Flag(name: .customShort("w"), help: "Write instead of read.") var write = false
    @Option(name: .customLong("pattern"), help: "Byte written in write mode (default 0, as qemu-img).") var pattern: String = "0"
    @Option(name: .customLong("flush-interval"), help: "Flush after this many writes (0: only at the end).") var flushInterval: Int = 0
    @Argument(help: "The image file.") var path: String

    func run() throws {
        try QCOW2Tool.guarded {
            guard let size = parseSize(size), size > 0, size <= 1 << 30 else { throw ValidationError("invalid request size") }
            guard let parsedStep = parseSize(step ?? String(size)) else { throw ValidationError("invalid step size") }
            let step = parsedStep == 0 ? size : parsedStep  // as qemu-img bench
            guard let start = parseSize(offset) else { throw ValidationError("invalid offset") }
            guard count >= 0, (1...256).contains(threads), depth >= 1 else { throw ValidationError("invalid -c, -t or -d") }
            var options = image.openOptions()
            options.writable = write
            let path = try image.secret.apply(self.path, to: &options)
            let disk = try DiskImage.open(path: path, options: options)
            let fill: UInt8
            if pattern.hasPrefix("0x"), let p = UInt8(pattern.dropFirst(2), radix: 16) { fill = p } else if let p = UInt8(pattern) { fill = p } else {
                throw ValidationError("invalid pattern '\(pattern)'")
            }
            let writing = write, interval = flushInterval
            let imageSize = disk.virtualSize
            guard imageSize >= size else { throw ValidationError("image is smaller than one request") }
            if flushInterval > 0 && flushInterval < depth { throw ValidationError("Flush interval can't be smaller than depth") }
            print("Sending \(count) \(write ? "write" : "read") requests, \(size) bytes each, \(depth) in parallel (starting at offset \(start), step size \(step))")
            if write && flushInterval > 0 { print("Sending flush every \(flushInterval) requests") }
            let next = Atomic<Int>(0)
            let failure = Mutex<(any Error)?>(nil)
            let requestCount = count
            let begin = DispatchTime.now().uptimeNanoseconds
            DispatchQueue.concurrentPerform(iterations: threads) { _ in
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(size), alignment: 4096)
                defer { buffer.deallocate() }
                buffer.initializeMemory(as: UInt8.self, repeating: fill)
                while true {
                    let i = next.add(1, ordering: .relaxed).oldValue
                    guard i < requestCount else { return }
                    // Request i starts at offset + i*step, wrapped like qemu-img bench; as
                    // there, a request that then runs past the end fails.
                    let (m, overflow) = UInt64(i).multipliedReportingOverflow(by: step)
                    let at = (overflow ? 0 : (start &+ m)) % imageSize
                    do {
                        guard at + size <= imageSize else {
                            throw ValidationError("Failed request: Input/output error")
                        }
                        if writing {
                            try disk.write(at: at, from: UnsafeRawBufferPointer(buffer))
                            if interval > 0 && (i + 1) % interval == 0 { try disk.flush() }
                        } else {
                            try disk.read(at: at, into: buffer)
                        }
                    } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        return
                    }
                }
            }
            if let error = failure.withLock({ $0 }) { throw error }
            if writing { try disk.close() }
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - begin) / 1e9
            let ms = Int((seconds * 1000).rounded())
            print("Run completed in \(ms / 1000).\(String(repeating: "0", count: 3 - String(ms % 1000).count))\(ms % 1000) seconds.")
        }
    }
}
