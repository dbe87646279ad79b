#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Zero detection for sparse output and zero-write elision.
public enum ZeroDetection {
    /// A page of zeros to compare against: libc's `memcmp` is vectorized, which makes this
    /// several times faster than a byte or word loop in Swift.
    nonisolated(unsafe) private static let zeroPage: UnsafeMutableRawPointer = {
        let p = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 64)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: 4096)
        return p
    }()

    /// True when every byte is zero.
    public static func isZero(_ data: UnsafeRawBufferPointer) -> Bool {
        guard let base = data.baseAddress, data.count > 0 else { return true }
        // Most non-zero data is non-zero at the start: check a word first.
        if data.count >= 8 && data.loadUnaligned(as: UInt64.self) != 0 { return false }
        var offset = 0
        while offset < data.count {
            let n = min(4096, data.count - offset)
            if memcmp(base + offset, zeroPage, n) != 0 { return false }
            offset += n
        }
        return true
    }
}
