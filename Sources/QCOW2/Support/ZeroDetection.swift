/// Zero detection for sparse output and zero-write elision.
public enum ZeroDetection {
    /// True when every byte is zero (eight bytes at a time).
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
