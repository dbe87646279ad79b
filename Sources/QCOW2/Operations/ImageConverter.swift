import Dispatch
import Synchronization

/// Copies one or more source disks (concatenated) into a writable target, the engine of
/// `qcow2 convert`.
///
/// Work is planned from the sources' allocation maps: ranges that read as zeros are never
/// read (the target stays sparse), data ranges are rounded out to the target's cluster size
/// and split into chunks that worker threads read, test for zero blocks (`sparseSize`,
/// qemu-img's `-S`), optionally compress cluster by cluster, and write. With a target that
/// has a backing file (`-B`), each block is compared with the backing content and only the
/// difference is written.
public struct ImageConverter: Sendable {
    public var sparseSize: Int = 4096
    public var threads: Int = 4
    public var compress = false
    /// Bytes per work item.
    public var chunkSize: UInt64 = 2 << 20
    /// The target already has content (`-n`, or a backing file): zero ranges must be written.
    public var targetMayHaveData = false
    /// A device holding the target's backing content, to write only differences (`-B`).
    public var backing: (any BlockDevice)?

    public init() {}

    public func run(sources: [any BlockDevice], target: DiskImage, progress: (@Sendable (Double) -> Void)? = nil) throws {
        let total = sources.reduce(UInt64(0)) { $0 + $1.virtualSize }
        guard target.virtualSize >= total else {
            throw QCOW2Error.invalidArgument("target is smaller (\(target.virtualSize) bytes) than the source (\(total) bytes)")
        }
        let cs = target.clusterSize
        let done = Atomic<UInt64>(0)
        let lastReported = Mutex<Int>(-1)
        @Sendable func report(_ bytes: UInt64) {
            guard let progress, total > 0 else { return }
            let now = done.add(bytes, ordering: .relaxed).newValue
            let permille = Int(Double(now) / Double(total) * 1000)
            lastReported.withLock { last in
                if permille > last {
                    last = permille
                    progress(Double(now) / Double(total))
                }
            }
        }
        var base: UInt64 = 0
        for source in sources {
            let size = source.virtualSize
            var windowStart: UInt64 = 0
            let window: UInt64 = 1 << 30
            while windowStart < size {
                // Plan: data ranges rounded out to whole target clusters and merged; the gaps
                // between them are written as zeros only when the target may hold data.
                let windowEnd = min(size, windowStart + window)
                var dataRanges: [(UInt64, UInt64)] = []
                for e in try source.allocationMap(offset: windowStart, length: window) where e.data {
                    let alignedStart = (base + e.start) & ~(cs - 1)
                    let s = max(windowStart, alignedStart >= base ? alignedStart - base : 0)
                    let en = min(windowEnd, ((base + e.end + cs - 1) & ~(cs - 1)) - base)
                    if let last = dataRanges.last, last.1 >= s {
                        dataRanges[dataRanges.count - 1].1 = max(last.1, en)
                    } else {
                        dataRanges.append((s, en))
                    }
                }
                var ranges: [(UInt64, UInt64, Bool)] = []
                var cursor = windowStart
                for (s, e) in dataRanges {
                    if targetMayHaveData && s > cursor { ranges.append((cursor, s, false)) }
                    ranges.append((s, e, true))
                    cursor = e
                }
                if targetMayHaveData && cursor < windowEnd { ranges.append((cursor, windowEnd, false)) }
                let planned = ranges.reduce(UInt64(0)) { $0 + ($1.1 - $1.0) }
                report((windowEnd - windowStart) - min(planned, windowEnd - windowStart))
                var chunks: [(UInt64, UInt64, Bool)] = []
                for (s, e, d) in ranges where e > s {
                    var p = s
                    while p < e {
                        let n = min(chunkSize, e - p)
                        chunks.append((p, n, d))
                        p += n
                    }
                }
                try process(chunks: chunks, source: source, base: base, target: target, report: report)
                windowStart += window
            }
            base += size
        }
        try target.flush()
    }

    private func process(chunks: [(UInt64, UInt64, Bool)], source: any BlockDevice, base: UInt64, target: DiskImage,
                         report: @Sendable (UInt64) -> Void) throws {
        guard !chunks.isEmpty else { return }
        let next = Atomic<Int>(0)
        let failure = Mutex<(any Error)?>(nil)
        let maxChunk = Int(chunks.map { $0.1 }.max() ?? 0)
        let workers = max(1, min(threads, chunks.count))
        let plan = self
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: maxChunk, alignment: 4096)
            let other = UnsafeMutableRawBufferPointer.allocate(byteCount: maxChunk, alignment: 4096)
            defer {
                buffer.deallocate()
                other.deallocate()
            }
            while true {
                let i = next.add(1, ordering: .relaxed).oldValue
                guard i < chunks.count, failure.withLock({ $0 == nil }) else { return }
                let (offset, length, isData) = chunks[i]
                let data = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(length)])
                do {
                    if isData {
                        try source.read(at: offset, into: data)
                    } else {
                        data.initializeMemory(as: UInt8.self, repeating: 0)
                    }
                    try plan.store(UnsafeRawBufferPointer(data), at: base + offset, target: target,
                                   scratch: UnsafeMutableRawBufferPointer(rebasing: other[0..<Int(length)]))
                } catch {
                    failure.withLock { if $0 == nil { $0 = error } }
                    return
                }
                report(length)
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }

    /// Writes one chunk: block by block, skipping zeros the target already reads as zeros
    /// and (with a backing) blocks equal to the backing content.
    private func store(_ data: UnsafeRawBufferPointer, at offset: UInt64, target: DiskImage,
                       scratch: UnsafeMutableRawBufferPointer) throws {
        var same: UnsafeRawBufferPointer?
        if let backing {
            let inside = offset < backing.virtualSize ? Int(min(UInt64(data.count), backing.virtualSize - offset)) : 0
            if inside > 0 { try backing.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: scratch[0..<inside])) }
            if inside < data.count { UnsafeMutableRawBufferPointer(rebasing: scratch[inside...]).initializeMemory(as: UInt8.self, repeating: 0) }
            same = UnsafeRawBufferPointer(scratch)
        }
        let block = compress ? Int(target.clusterSize) : (sparseSize > 0 ? sparseSize : data.count)
        var pos = 0
        var runStart = -1
        func flushRun(_ end: Int) throws {
            guard runStart >= 0 else { return }
            try target.write(at: offset + UInt64(runStart), from: UnsafeRawBufferPointer(rebasing: data[runStart..<end]))
            runStart = -1
        }
        while pos < data.count {
            let end = min(data.count, pos + block - Int((offset + UInt64(pos)) % UInt64(block)))
            let piece = UnsafeRawBufferPointer(rebasing: data[pos..<end])
            let zero = ZeroDetection.isZero(piece)
            var unchanged = false
            if let same {
                unchanged = memcmp(piece.baseAddress!, same.baseAddress! + pos, end - pos) == 0
            }
            if unchanged || (zero && backing == nil && !targetMayHaveData) {
                try flushRun(pos)
            } else if zero {
                try flushRun(pos)
                try target.writeZeroes(at: offset + UInt64(pos), length: UInt64(end - pos), unmap: backing == nil)
            } else if compress && (offset + UInt64(pos)) % target.clusterSize == 0
                        && (UInt64(piece.count) == target.clusterSize || offset + UInt64(end) == target.virtualSize) {
                try flushRun(pos)
                try target.writeCompressed(at: offset + UInt64(pos), from: piece)
            } else if runStart < 0 {
                runStart = pos
            }
            pos = end
        }
        try flushRun(data.count)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
