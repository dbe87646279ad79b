/// Guest-content comparison of two disks, the engine behind `qcow2 compare`.
public enum ContentComparison {
    /// The offset of the first differing byte, or nil when the disks read the same. Where
    /// one disk is longer, its extra part must read as zeros (qemu-img's non-strict rule).
    /// Ranges both allocation maps report as zero are skipped without reading.
    public static func firstDifference(_ a: any BlockDevice, _ b: any BlockDevice, chunk: Int = 1 << 20) throws -> UInt64? {
        let size = max(a.virtualSize, b.virtualSize)
        let bufA = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        let bufB = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer {
            bufA.deallocate()
            bufB.deallocate()
        }
        var pos: UInt64 = 0
        while pos < size {
            let n = Int(min(UInt64(chunk), size - pos))
            if try isZero(a, pos, n) && isZero(b, pos, n) {
                pos += UInt64(n)
                continue
            }
            let ra = UnsafeMutableRawBufferPointer(rebasing: bufA[0..<n])
            let rb = UnsafeMutableRawBufferPointer(rebasing: bufB[0..<n])
            try readPadded(a, pos, ra)
            try readPadded(b, pos, rb)
            if memcmp(ra.baseAddress!, rb.baseAddress!, n) != 0 {
                for i in 0..<n where ra[i] != rb[i] { return pos + UInt64(i) }
            }
            pos += UInt64(n)
        }
        return nil
    }

    private static func isZero(_ d: any BlockDevice, _ offset: UInt64, _ n: Int) throws -> Bool {
        guard offset < d.virtualSize else { return true }
        let map = try d.allocationMap(offset: offset, length: UInt64(n))
        let covered = map.reduce(UInt64(0)) { $0 + $1.length }
        let end = min(d.virtualSize, offset + UInt64(n))
        return map.allSatisfy { $0.zero && !$0.data } && covered == end - offset
    }

    /// Reads what lies inside the disk and zero-fills past its end.
    private static func readPadded(_ d: any BlockDevice, _ offset: UInt64, _ buf: UnsafeMutableRawBufferPointer) throws {
        let inside = offset < d.virtualSize ? Int(min(UInt64(buf.count), d.virtualSize - offset)) : 0
        if inside > 0 { try d.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: buf[0..<inside])) }
        if inside < buf.count {
            UnsafeMutableRawBufferPointer(rebasing: buf[inside...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
