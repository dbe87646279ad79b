/// The LUKS anti-forensic information splitter (cryptsetup's `AF_split`/`AF_merge`, QEMU's
/// `qcrypto_afsplit_encode`/`decode`).
///
/// A key of `n` bytes is expanded to `stripes × n` bytes such that losing any one stripe
/// loses the key:
///
/// ```
/// diffuse(buf):  for block j (digest-size chunks, the last one truncated):
///                    out_j = H(be32(j) ‖ chunk_j)[0 ..< len(chunk_j)]
/// split(MK):     d = 0;  for k in 0 ..< stripes-1 { s_k = random; d = diffuse(d ⊕ s_k) }
///                s_last = d ⊕ MK
/// merge(S):      d = 0;  for k in 0 ..< stripes-1 { d = diffuse(d ⊕ S_k) };  MK = d ⊕ S_last
/// ```
public enum AFSplitter {
    /// Largest accepted stripe count (cryptsetup and QEMU always use 4000).
    public static let maximumStripes = 65_536
    /// Largest accepted key length in bytes.
    public static let maximumKeyLength = 1024

    /// Splits `key` into `stripes × key.count` bytes of anti-forensic material, with
    /// random stripes from the libcrypto CSPRNG.
    public static func split(key: [UInt8], stripes: Int, hash: HashAlgorithm) throws(CryptoError) -> [UInt8] {
        try key.withRawBytes { (k) throws(CryptoError) in
            try split(key: k, stripes: stripes, hash: hash) { (buffer) throws(CryptoError) in
                try secureRandom(into: buffer)
            }
        }
    }

    /// Splits a secret key (see ``split(key:stripes:hash:)-([UInt8],_,_)``).
    public static func split(key: SecretBytes, stripes: Int, hash: HashAlgorithm) throws(CryptoError) -> [UInt8] {
        try key.withUnsafeBytes { (k) throws(CryptoError) in
            try split(key: k, stripes: stripes, hash: hash) { (buffer) throws(CryptoError) in
                try secureRandom(into: buffer)
            }
        }
    }

    /// Split with a caller-supplied source of stripe bytes (deterministic tests).
    static func split(
        key: UnsafeRawBufferPointer, stripes: Int, hash: HashAlgorithm,
        random: (UnsafeMutableRawBufferPointer) throws(CryptoError) -> Void
    ) throws(CryptoError) -> [UInt8] {
        let n = key.count
        try validate(keyLength: n, stripes: stripes)
        var material = [UInt8](repeating: 0, count: n * stripes)
        var d = [UInt8](repeating: 0, count: n)
        defer { wipe(&d) }
        let hasher = try IncrementalHash(hash)
        try material.withMutableRawBytes { (out) throws(CryptoError) in
            // All stripes but the last are random.
            try random(UnsafeMutableRawBufferPointer(rebasing: out[0..<(n * (stripes - 1))]))
            for k in 0..<(stripes - 1) {
                for i in 0..<n { d[i] ^= out[k * n + i] }
                try diffuse(&d, hasher)
            }
            let last = (stripes - 1) * n
            for i in 0..<n { out[last + i] = d[i] ^ key[i] }
        }
        return material
    }

    /// Merges `stripes × keyLength` bytes of material back into the key.
    public static func merge(material: [UInt8], keyLength: Int, stripes: Int, hash: HashAlgorithm)
        throws(CryptoError) -> [UInt8]
    {
        let key = try material.withRawBytes { (m) throws(CryptoError) in
            try mergeSecret(material: m, keyLength: keyLength, stripes: stripes, hash: hash)
        }
        return key.bytes
    }

    /// Merge into wiped memory.
    static func mergeSecret(material: UnsafeRawBufferPointer, keyLength n: Int, stripes: Int, hash: HashAlgorithm)
        throws(CryptoError) -> SecretBytes
    {
        try validate(keyLength: n, stripes: stripes)
        guard material.count >= n * stripes else {
            throw .invalidParameter("AF material is \(material.count) bytes, need \(n * stripes)")
        }
        var d = [UInt8](repeating: 0, count: n)
        defer { wipe(&d) }
        let hasher = try IncrementalHash(hash)
        for k in 0..<(stripes - 1) {
            for i in 0..<n { d[i] ^= material[k * n + i] }
            try diffuse(&d, hasher)
        }
        let last = (stripes - 1) * n
        return SecretBytes(count: n) { out in
            for i in 0..<n { out[i] = d[i] ^ material[last + i] }
        }
    }

    private static func validate(keyLength: Int, stripes: Int) throws(CryptoError) {
        guard keyLength >= 1, keyLength <= maximumKeyLength else {
            throw .invalidParameter("AF key length \(keyLength) (must be 1…\(maximumKeyLength))")
        }
        guard stripes >= 1, stripes <= maximumStripes else {
            throw .invalidParameter("AF stripe count \(stripes) (must be 1…\(maximumStripes))")
        }
    }

    /// `diffuse` in place: each digest-size block j replaced by H(be32(j) ‖ block), the last
    /// one truncated.
    private static func diffuse(_ buffer: inout [UInt8], _ hasher: IncrementalHash) throws(CryptoError) {
        let ds = hasher.algorithm.digestSize
        var digest = [UInt8](repeating: 0, count: ds)
        defer { wipe(&digest) }
        let count = buffer.count
        var j = 0
        var start = 0
        while start < count {
            let length = min(ds, count - start)
            try hasher.reset()
            var counter = UInt32(truncatingIfNeeded: j).bigEndian
            try withUnsafeBytes(of: &counter) { (c) throws(CryptoError) in try hasher.update(c) }
            try buffer.withRawBytes { (b) throws(CryptoError) in
                try hasher.update(UnsafeRawBufferPointer(rebasing: b[start..<(start + length)]))
            }
            try digest.withMutableRawBytes { (out) throws(CryptoError) in try hasher.finish(into: out) }
            for i in 0..<length { buffer[start + i] = digest[i] }
            start += length
            j += 1
        }
    }
}
