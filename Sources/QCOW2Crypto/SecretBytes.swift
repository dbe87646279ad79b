import COpenSSL

/// Key material owned in one heap buffer that is wiped (`OPENSSL_cleanse`) when released.
///
/// Master keys, slot keys and ESSIV keys live in `SecretBytes` inside this module. The
/// buffer never moves and is never copied implicitly (it is a class, not an array), so
/// wiping it on `deinit` really removes the key from this process's memory. Reading the
/// bytes out with ``bytes`` makes an ordinary array the caller is responsible for.
///
/// Instances are immutable after initialization and therefore `Sendable`.
public final class SecretBytes: @unchecked Sendable {
    private let storage: UnsafeMutableRawBufferPointer

    /// Number of bytes.
    public var count: Int { storage.count }

    /// Copies `bytes` into a new secret buffer. The caller should wipe its own copy
    /// (see ``SecretBytes/wipe(_:)``) if it was secret.
    public init(_ bytes: some Collection<UInt8>) {
        storage = .allocate(byteCount: bytes.count, alignment: 16)
        storage.copyBytes(from: bytes)
    }

    /// Zero-filled buffer of `count` bytes, filled in place by `fill` (used to derive keys
    /// directly into wiped memory).
    init<E: Error>(count: Int, fill: (UnsafeMutableRawBufferPointer) throws(E) -> Void) throws(E) {
        storage = .allocate(byteCount: count, alignment: 16)
        storage.initializeMemory(as: UInt8.self, repeating: 0)
        do {
            try fill(storage)
        } catch {
            Self.release(storage)
            throw error
        }
    }

    /// `count` bytes from the libcrypto CSPRNG (`RAND_bytes`).
    public static func random(count: Int) throws(CryptoError) -> SecretBytes {
        try SecretBytes(count: count) { (buffer) throws(CryptoError) in
            try secureRandom(into: buffer)
        }
    }

    deinit { Self.release(storage) }

    private static func release(_ storage: UnsafeMutableRawBufferPointer) {
        if let base = storage.baseAddress { OPENSSL_cleanse(base, storage.count) }
        storage.deallocate()
    }

    /// Calls `body` with the bytes; the pointer must not escape.
    public func withUnsafeBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        try body(UnsafeRawBufferPointer(storage))
    }

    /// A copy of the bytes as an array. The array is not wiped automatically: prefer
    /// ``withUnsafeBytes(_:)`` and call ``SecretBytes/wipe(_:)`` on copies when done.
    public var bytes: [UInt8] { Array(UnsafeRawBufferPointer(storage)) }

    /// Constant-time comparison (`CRYPTO_memcmp`).
    public func isEqual(to other: SecretBytes) -> Bool {
        guard count == other.count else { return false }
        guard count > 0, let a = storage.baseAddress, let b = other.storage.baseAddress else { return true }
        return CRYPTO_memcmp(a, b, count) == 0
    }
}

extension SecretBytes {
    /// Overwrites an array's bytes with zeros in a way the optimizer cannot remove
    /// (`OPENSSL_cleanse`). Copies made earlier (copy-on-write) are not reached.
    public static func wipe(_ bytes: inout [UInt8]) {
        cleanse(&bytes)
    }
}

/// See ``SecretBytes/wipe(_:)``.
func wipe(_ bytes: inout [UInt8]) {
    cleanse(&bytes)
}

private func cleanse(_ bytes: inout [UInt8]) {
    bytes.withUnsafeMutableBytes { buffer in
        if let base = buffer.baseAddress { OPENSSL_cleanse(base, buffer.count) }
    }
}

/// Fills `buffer` from the libcrypto CSPRNG.
func secureRandom(into buffer: UnsafeMutableRawBufferPointer) throws(CryptoError) {
    guard let base = buffer.baseAddress, buffer.count > 0 else { return }
    var done = 0
    while done < buffer.count {
        let chunk = min(buffer.count - done, 1 << 30)
        guard RAND_bytes(base.advanced(by: done).assumingMemoryBound(to: UInt8.self), Int32(chunk)) == 1 else {
            throw openSSLError("RAND_bytes")
        }
        done += chunk
    }
}

/// `count` random bytes from the libcrypto CSPRNG (salts, AF stripes, garbage).
func secureRandomBytes(_ count: Int) throws(CryptoError) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    try bytes.withMutableRawBytes { (buffer) throws(CryptoError) in try secureRandom(into: buffer) }
    return bytes
}

/// Drains this thread's OpenSSL error queue into a `CryptoError` naming `operation`.
/// OpenSSL reason strings describe the failure ("xts duplicated keys", "invalid key
/// length"); they never contain key bytes.
func openSSLError(_ operation: String) -> CryptoError {
    var detail = ""
    let code = ERR_get_error()
    if code != 0 {
        var buffer = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buffer, buffer.count)
        detail = buffer.withUnsafeBufferPointer { p in
            String(decoding: p.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }
    ERR_clear_error()
    return .openSSL(operation: operation, detail: detail)
}

extension Array where Element == UInt8 {
    /// `withUnsafeBytes` with a typed-throws body (the stdlib's is untyped `rethrows`).
    func withRawBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let result: Result<R, E> = withUnsafeBytes { p in Result { () throws(E) in try body(p) } }
        return try result.get()
    }

    /// `withUnsafeMutableBytes` with a typed-throws body.
    mutating func withMutableRawBytes<R, E: Error>(_ body: (UnsafeMutableRawBufferPointer) throws(E) -> R) throws(E)
        -> R
    {
        let result: Result<R, E> = withUnsafeMutableBytes { p in Result { () throws(E) in try body(p) } }
        return try result.get()
    }
}
