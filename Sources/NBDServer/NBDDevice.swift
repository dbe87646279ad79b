import QCOW2
import Synchronization

/// What the NBD server needs from a disk: `BlockDevice` reads and allocation maps, plus the
/// write side. Every method is synchronous and may block; the server calls them only from
/// its I/O thread pool, never from an event loop.
public protocol NBDDevice: BlockDevice {
    /// True when the device accepts writes.
    var isWritable: Bool { get }
    /// Writes `data` at `offset` (inside the disk).
    func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws
    /// Makes a range read as zeros; `unmap` allows releasing storage.
    func writeZeroes(at offset: UInt64, length: UInt64, unmap: Bool) throws
    /// Guest discard (TRIM).
    func discard(at offset: UInt64, length: UInt64) throws
    /// Makes every completed write durable (the whole device, whatever connection wrote).
    func flush() throws
}

extension DiskImage: NBDDevice {}

/// An in-memory disk (for tests and as a reference implementation of `NBDDevice`).
public final class MemoryDevice: NBDDevice, Sendable {
    private let bytes: Mutex<[UInt8]>
    public let isWritable: Bool
    public let virtualSize: UInt64

    public init(contents: [UInt8], writable: Bool = true) {
        virtualSize = UInt64(contents.count)
        bytes = Mutex(contents)
        isWritable = writable
    }

    public convenience init(size: Int, writable: Bool = true) {
        self.init(contents: [UInt8](repeating: 0, count: size), writable: writable)
    }

    /// A copy of the whole content.
    public var contents: [UInt8] { bytes.withLock { $0 } }

    private func check(_ offset: UInt64, _ count: UInt64) throws {
        guard offset <= virtualSize, count <= virtualSize - offset else {
            throw QCOW2Error.invalidArgument("request of \(count) bytes at offset \(offset) is past the end")
        }
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try check(offset, UInt64(buffer.count))
        bytes.withLock { b in
            b.withUnsafeBytes { src in
                buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[Int(offset)..<(Int(offset) + buffer.count)]))
            }
        }
    }

    /// 4 KiB granularity: all-zero blocks are reported as zero holes, like a sparse file.
    public func allocationMap(offset: UInt64, length: UInt64) throws -> [AllocationExtent] {
        guard offset < virtualSize else { return [] }
        let end = offset + min(length, virtualSize - offset)
        return bytes.withLock { b in
            var out: [AllocationExtent] = []
            var pos = offset
            while pos < end {
                let next = min(end, (pos / 4096 + 1) * 4096)
                let zero = b[Int(pos)..<Int(next)].allSatisfy { $0 == 0 }
                let e = AllocationExtent(start: pos, length: next - pos, depth: 0, present: !zero, zero: zero, data: !zero,
                                         offset: nil, compressed: false, file: nil)
                if let last = out.last, last.canMerge(with: e) { out[out.count - 1].length += e.length } else { out.append(e) }
                pos = next
            }
            return out
        }
    }

    public func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws {
        guard isWritable else { throw QCOW2Error.invalidArgument("read-only device") }
        try check(offset, UInt64(data.count))
        bytes.withLock { b in
            b.withUnsafeMutableBytes { dst in
                UnsafeMutableRawBufferPointer(rebasing: dst[Int(offset)..<(Int(offset) + data.count)]).copyMemory(from: data)
            }
        }
    }

    public func writeZeroes(at offset: UInt64, length: UInt64, unmap: Bool) throws {
        guard isWritable else { throw QCOW2Error.invalidArgument("read-only device") }
        try check(offset, length)
        bytes.withLock { b in
            for i in Int(offset)..<Int(offset + length) { b[i] = 0 }
        }
    }

    public func discard(at offset: UInt64, length: UInt64) throws {
        try writeZeroes(at: offset, length: length, unmap: true)
    }

    public func flush() throws {}
}
