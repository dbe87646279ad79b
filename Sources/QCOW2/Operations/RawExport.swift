import Dispatch
import Synchronization

/// Copies a virtual disk into a raw file, the engine behind `qcow2 convert -O raw`.
///
/// Ranges the allocation map reports as zero or unallocated are never read or written (the
/// output is sparse); data ranges are read in chunks on several threads and written with
/// `pwrite`, skipping all-zero blocks of `sparseSize` bytes like qemu-img's `-S`.
public struct RawExport: Sendable {
    /// Zero-detection granularity (qemu-img `-S`, default 4 KiB); 0 writes every data byte.
    public var sparseSize: Int = 4096
    /// Worker threads reading and writing chunks.
    public var threads: Int = 4
    /// Largest single read.
    public var chunkSize: Int = 2 << 20

    public init() {}

    /// Runs the copy; `progress` receives a fraction in 0...1 (from any thread, serialized).
    public func run(source: any BlockDevice, destination: String, progress: (@Sendable (Double) -> Void)? = nil) throws {
        let out = try FileHandle(creating: destination)
        let size = source.virtualSize
        try out.truncate(to: size)

        // Work list: data ranges split into chunks. Built window by window so that the map of
        // a huge disk is never held at once.
        let window: UInt64 = 1 << 30
        var windowStart: UInt64 = 0
        let done = Atomic<UInt64>(0)
        let failure = Mutex<(any Error)?>(nil)
        let progressLock = Mutex<Int>(-1)
        @Sendable func report(_ bytes: UInt64) {
            guard let progress, size > 0 else { return }
            let total = done.add(bytes, ordering: .relaxed).newValue
            let permille = Int(Double(total) / Double(size) * 1000)
            progressLock.withLock { last in
                if permille > last { last = permille; progress(Double(total) / Double(size)) }
            }
        }
        while windowStart < size {
            let map = try source.allocationMap(offset: windowStart, length: window)
            var chunks: [(UInt64, Int)] = []
            var skipped: UInt64 = 0
            for e in map {
                if !e.data {
                    skipped += e.length
                    continue
                }
                var pos = e.start
                while pos < e.end {
                    let n = Int(min(UInt64(chunkSize), e.end - pos))
                    chunks.append((pos, n))
                    pos += UInt64(n)
                }
            }
            report(skipped)
            let work = chunks
            let next = Atomic<Int>(0)
            let workers = max(1, min(threads, chunks.count))
            let sparse = sparseSize
            let chunkBytes = chunkSize
            DispatchQueue.concurrentPerform(iterations: workers) { _ in
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunkBytes, alignment: 4096)
                defer { buffer.deallocate() }
                while true {
                    let i = next.add(1, ordering: .relaxed).oldValue
                    guard i < work.count, failure.withLock({ $0 == nil }) else { return }
                    let (offset, length) = work[i]
                    let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
                    do {
                        try source.read(at: offset, into: slice)
                        try RawExport.writeNonZero(UnsafeRawBufferPointer(slice), at: offset, to: out, block: sparse)
                    } catch {
                        failure.withLock { if $0 == nil { $0 = error } }
                        return
                    }
                    report(UInt64(length))
                }
            }
            if let error = failure.withLock({ $0 }) { throw error }
            windowStart += window
        }
        try out.sync()
    }

    /// Writes `data` at `offset`, leaving out all-zero blocks of `block` bytes (aligned to
    /// the guest offset) so the output stays sparse.
    static func writeNonZero(_ data: UnsafeRawBufferPointer, at offset: UInt64, to out: FileHandle, block: Int) throws {
        guard block > 0 else { return try out.write(data, at: offset) }
        var pos = 0
        var runStart = -1
        while pos < data.count {
            let blockEnd = min(data.count, pos + block - Int((offset + UInt64(pos)) % UInt64(block)))
            let zero = isZero(UnsafeRawBufferPointer(rebasing: data[pos..<blockEnd]))
            if zero {
                if runStart >= 0 {
                    try out.write(UnsafeRawBufferPointer(rebasing: data[runStart..<pos]), at: offset + UInt64(runStart))
                    runStart = -1
                }
            } else if runStart < 0 {
                runStart = pos
            }
            pos = blockEnd
        }
        if runStart >= 0 {
            try out.write(UnsafeRawBufferPointer(rebasing: data[runStart..<data.count]), at: offset + UInt64(runStart))
        }
    }

    /// True when every byte is zero (word-at-a-time).
    public static func isZero(_ data: UnsafeRawBufferPointer) -> Bool {
        var i = 0
        let n = data.count
        while i + 8 <= n {
            if data.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < n {
            if data[i] != 0 { return false }
            i += 1
        }
        return true
    }
}
