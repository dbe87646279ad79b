import COpenSSL

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The hash functions LUKS1 headers name in `hash_spec` (PBKDF2 and the AF splitter) and
/// in ESSIV IV generators. Raw values are the LUKS/QEMU spellings.
public enum HashAlgorithm: String, Sendable, CaseIterable, CustomStringConvertible {
    case md5
    case sha1
    case sha224
    case sha256
    case sha384
    case sha512
    case ripemd160

    /// Parses a LUKS `hash_spec` / QEMU `hash-alg` name (exact, lower-case, as QEMU does).
    public init?(name: String) {
        self.init(rawValue: name)
    }

    /// The LUKS/QEMU spelling (`sha256`).
    public var name: String { rawValue }

    /// The LUKS/QEMU spelling.
    public var description: String { rawValue }

    /// Digest length in bytes.
    public var digestSize: Int {
        switch self {
        case .md5: 16
        case .sha1, .ripemd160: 20
        case .sha224: 28
        case .sha256: 32
        case .sha384: 48
        case .sha512: 64
        }
    }

    /// The libcrypto digest (`EVP_sha256()`, …).
    var evpMD: OpaquePointer? {
        switch self {
        case .md5: EVP_md5()
        case .sha1: EVP_sha1()
        case .sha224: EVP_sha224()
        case .sha256: EVP_sha256()
        case .sha384: EVP_sha384()
        case .sha512: EVP_sha512()
        case .ripemd160: EVP_ripemd160()
        }
    }

    /// Whether the system libcrypto provides this digest (RIPEMD-160 needs OpenSSL ≥ 3.0.7
    /// or the legacy provider; MD5 can be disabled in FIPS setups).
    public var isAvailable: Bool {
        (try? digest([UInt8]())) != nil
    }

    /// The digest of a secret (ESSIV key derivation) into wiped memory.
    func digestSecret(_ secret: SecretBytes) throws(CryptoError) -> SecretBytes {
        try secret.withUnsafeBytes { (input) throws(CryptoError) in
            try SecretBytes(count: digestSize) { (out) throws(CryptoError) in
                guard let md = evpMD else { throw .unsupportedHash(name) }
                var outLength: UInt32 = 0
                guard EVP_Digest(input.baseAddress, input.count,
                        out.baseAddress?.assumingMemoryBound(to: UInt8.self), &outLength, md, nil) == 1,
                    Int(outLength) == digestSize
                else { throw openSSLError("EVP_Digest(\(name))") }
            }
        }
    }

    /// The digest of `data` (one-shot `EVP_Digest`).
    public func digest(_ data: [UInt8]) throws(CryptoError) -> [UInt8] {
        try data.withRawBytes { input throws(CryptoError) in try digest(input) }
    }

    /// The digest of raw bytes.
    public func digest(_ input: UnsafeRawBufferPointer) throws(CryptoError) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: digestSize)
        try digest(input, into: &out)
        return out
    }

    func digest(_ input: UnsafeRawBufferPointer, into out: inout [UInt8]) throws(CryptoError) {
        guard let md = evpMD else { throw .unsupportedHash(name) }
        var outLength: UInt32 = 0
        let ok = out.withUnsafeMutableBufferPointer { o in
            EVP_Digest(input.baseAddress, input.count, o.baseAddress, &outLength, md, nil)
        }
        guard ok == 1, Int(outLength) == digestSize else { throw openSSLError("EVP_Digest(\(name))") }
    }
}

/// An incremental hash over one reusable `EVP_MD_CTX` (the AF splitter hashes thousands of
/// short inputs). One thread at a time.
final class IncrementalHash {
    let algorithm: HashAlgorithm
    private let context: OpaquePointer
    private let md: OpaquePointer

    init(_ algorithm: HashAlgorithm) throws(CryptoError) {
        guard let md = algorithm.evpMD else { throw .unsupportedHash(algorithm.name) }
        guard let context = EVP_MD_CTX_new() else { throw openSSLError("EVP_MD_CTX_new") }
        self.algorithm = algorithm
        self.md = md
        self.context = context
    }

    deinit { EVP_MD_CTX_free(context) }

    func reset() throws(CryptoError) {
        guard EVP_DigestInit_ex(context, md, nil) == 1 else {
            throw openSSLError("EVP_DigestInit_ex(\(algorithm.name))")
        }
    }

    func update(_ bytes: UnsafeRawBufferPointer) throws(CryptoError) {
        guard bytes.count > 0 else { return }
        guard EVP_DigestUpdate(context, bytes.baseAddress, bytes.count) == 1 else {
            throw openSSLError("EVP_DigestUpdate(\(algorithm.name))")
        }
    }

    /// Writes the full digest to `out` (which must hold `digestSize` bytes).
    func finish(into out: UnsafeMutableRawBufferPointer) throws(CryptoError) {
        var length: UInt32 = 0
        guard out.count >= algorithm.digestSize,
            EVP_DigestFinal_ex(context, out.baseAddress?.assumingMemoryBound(to: UInt8.self), &length) == 1,
            Int(length) == algorithm.digestSize
        else { throw openSSLError("EVP_DigestFinal_ex(\(algorithm.name))") }
    }
}

/// PBKDF2-HMAC (RFC 8018 / RFC 2898) through libcrypto's `PKCS5_PBKDF2_HMAC`.
public enum PBKDF2 {
    /// Derives `keyLength` bytes from `password` and `salt` with `iterations` rounds of
    /// HMAC-`hash`.
    ///
    /// - Parameters:
    ///   - iterations: 1 … `Int32.max` (libcrypto's limit).
    ///   - keyLength: 1 … 1 MiB.
    /// - Returns: the derived key. It is secret: wipe it with ``SecretBytes/wipe(_:)`` when done, or use
    ///   ``deriveSecret(password:salt:iterations:hash:keyLength:)``.
    public static func derive(
        password: [UInt8], salt: [UInt8], iterations: Int, hash: HashAlgorithm, keyLength: Int
    ) throws(CryptoError) -> [UInt8] {
        guard keyLength >= 0 else { throw .invalidParameter("PBKDF2 key length \(keyLength)") }
        var out = [UInt8](repeating: 0, count: keyLength)
        try password.withRawBytes { (pw) throws(CryptoError) in
            try salt.withRawBytes { (s) throws(CryptoError) in
                try out.withMutableRawBytes { (buffer) throws(CryptoError) in
                    try derive(password: pw, salt: s, iterations: iterations, hash: hash, into: buffer)
                }
            }
        }
        return out
    }

    /// Like ``derive(password:salt:iterations:hash:keyLength:)`` into a ``SecretBytes``
    /// that is wiped when released.
    public static func deriveSecret(
        password: [UInt8], salt: [UInt8], iterations: Int, hash: HashAlgorithm, keyLength: Int
    ) throws(CryptoError) -> SecretBytes {
        try password.withRawBytes { (pw) throws(CryptoError) in
            try salt.withRawBytes { (s) throws(CryptoError) in
                try deriveSecret(password: pw, salt: s, iterations: iterations, hash: hash, keyLength: keyLength)
            }
        }
    }

    static func deriveSecret(
        password: UnsafeRawBufferPointer, salt: UnsafeRawBufferPointer, iterations: Int,
        hash: HashAlgorithm, keyLength: Int
    ) throws(CryptoError) -> SecretBytes {
        guard keyLength >= 0 else { throw .invalidParameter("PBKDF2 key length \(keyLength)") }
        return try SecretBytes(count: keyLength) { (buffer) throws(CryptoError) in
            try derive(password: password, salt: salt, iterations: iterations, hash: hash, into: buffer)
        }
    }

    static func derive(
        password pw: UnsafeRawBufferPointer, salt s: UnsafeRawBufferPointer, iterations: Int,
        hash: HashAlgorithm, into out: UnsafeMutableRawBufferPointer
    ) throws(CryptoError) {
        guard iterations >= 1, iterations <= Int(Int32.max) else {
            throw .invalidParameter("PBKDF2 iteration count \(iterations) (must be 1…\(Int32.max))")
        }
        guard out.count >= 1, out.count <= 1 << 20 else {
            throw .invalidParameter("PBKDF2 key length \(out.count) (must be 1…\(1 << 20))")
        }
        guard let md = hash.evpMD else { throw .unsupportedHash(hash.name) }
        guard pw.count <= Int(Int32.max), s.count <= Int(Int32.max) else {
            throw .invalidParameter("PBKDF2 input longer than 2 GiB")
        }
        let ok = PKCS5_PBKDF2_HMAC(
            pw.baseAddress?.assumingMemoryBound(to: CChar.self), Int32(pw.count),
            s.baseAddress?.assumingMemoryBound(to: UInt8.self), Int32(s.count),
            Int32(iterations), md, Int32(out.count),
            out.baseAddress?.assumingMemoryBound(to: UInt8.self))
        guard ok == 1 else { throw openSSLError("PKCS5_PBKDF2_HMAC(\(hash.name))") }
    }

    /// How many PBKDF2 iterations per second of thread CPU time this machine does for the
    /// given input sizes. Matches QEMU's `qcrypto_pbkdf2_count_iters`: start at 2^15
    /// iterations, scale up until one run takes more than 500 ms of CPU time, then
    /// extrapolate. Takes roughly 0.5–1 s.
    public static func iterationsPerSecond(
        hash: HashAlgorithm, passwordLength: Int, saltLength: Int, keyLength: Int
    ) throws(CryptoError) -> UInt64 {
        try iterationsPerSecond(
            hash: hash, passwordLength: passwordLength, saltLength: saltLength, keyLength: keyLength,
            targetMilliseconds: 500)
    }

    static func iterationsPerSecond(
        hash: HashAlgorithm, passwordLength: Int, saltLength: Int, keyLength: Int, targetMilliseconds: UInt64
    ) throws(CryptoError) -> UInt64 {
        let password = [UInt8](repeating: 0x41, count: max(passwordLength, 0))
        let salt = [UInt8](repeating: 0x5A, count: max(saltLength, 0))
        var out = [UInt8](repeating: 0, count: max(keyLength, 1))
        var iterations: UInt64 = 1 << 15
        var elapsed: UInt64 = 0
        while true {
            guard iterations <= UInt64(Int32.max) else { break }
            let start = threadCPUMilliseconds()
            try password.withRawBytes { (pw) throws(CryptoError) in
                try salt.withRawBytes { (s) throws(CryptoError) in
                    try out.withMutableRawBytes { (buffer) throws(CryptoError) in
                        try derive(password: pw, salt: s, iterations: Int(iterations), hash: hash, into: buffer)
                    }
                }
            }
            elapsed = threadCPUMilliseconds() &- start
            if elapsed == 0 {
                iterations *= 2
            } else if elapsed > targetMilliseconds {
                break
            } else if elapsed < targetMilliseconds / 5 {
                iterations *= 10
            } else {
                iterations = iterations * targetMilliseconds * 2 / elapsed
            }
        }
        return iterations * 1000 / max(elapsed, 1)
    }

    /// CPU time consumed by the calling thread, in milliseconds (QEMU uses
    /// `getrusage(RUSAGE_THREAD)`; this is the same clock at a finer resolution).
    static func threadCPUMilliseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) * 1000 + UInt64(ts.tv_nsec) / 1_000_000
    }
}
