import COpenSSL
import Synchronization

/// Encrypts and decrypts whole 512-byte sectors in place, each sector with its own IV
/// derived from its sector number: the unit of qcow2 and LUKS encryption.
///
/// Matches QEMU's `qcrypto_block_encrypt`/`qcrypto_block_decrypt` with a 512-byte sector
/// size. A buffer of `n` sectors starting at sector `s` is processed as sectors
/// `s, s+1, …, s+n-1` (the sector number wraps at 2^64 like QEMU's `uint64_t`).
/// For LUKS payload data the sector number is the **host** offset / 512; for LUKS key
/// material it starts at 0 at the slot's material; for legacy qcow AES it is the
/// **guest** offset / 512.
///
/// Implementation: libcrypto EVP. The key schedule is set up once per instance; only the
/// IV is re-initialized per sector. AES-192-XTS, which OpenSSL lacks, is built from
/// AES-192-ECB and the standard XTS tweak chain.
///
/// Thread safety: an instance owns libcrypto contexts, which are not thread-safe, so one
/// instance must be used by one thread at a time (the class is deliberately not
/// `Sendable`). Use ``makeCopy()`` for another thread, or a ``SectorCipherPool``.
/// The contexts and the copy of the key are freed and wiped on `deinit`.
public final class SectorCipher {
    /// The encryption sector size: 512 bytes.
    public static let sectorSize = 512

    /// The cipher, mode and IV generator.
    public let spec: CipherSpec

    private enum Engine {
        /// CBC or XTS through EVP, re-initialized with the IV for every sector.
        case evpPerSector
        /// ECB over the whole buffer (no IV).
        case ecb
        /// XTS built from ECB: `mainEncrypt`/`mainDecrypt` are ECB with key 1, `tweak` is
        /// ECB-encrypt with key 2.
        case xtsFromECB
    }

    private let key: SecretBytes
    private let engine: Engine
    /// nil only for XTS with identical key halves (OpenSSL refuses to encrypt with them).
    private let mainEncrypt: OpaquePointer?
    private let mainDecrypt: OpaquePointer
    private let tweakEncrypt: OpaquePointer?
    private let essivEncrypt: OpaquePointer?
    /// 16 bytes of IV, then 512 bytes of XTS tweaks; wiped on deinit.
    private let scratch: UnsafeMutableRawPointer
    private static let scratchSize = 16 + sectorSize

    /// A cipher for `spec` with `key` (``CipherSpec/keyLength`` bytes: data key ‖ tweak key
    /// for XTS). The key is copied into wiped memory.
    public convenience init(spec: CipherSpec, key: [UInt8]) throws(CryptoError) {
        try self.init(spec: spec, key: SecretBytes(key))
    }

    /// A cipher for `spec` with `key`, shared by reference (it is immutable).
    public init(spec: CipherSpec, key: SecretBytes) throws(CryptoError) {
        guard key.count == spec.keyLength else {
            throw .invalidKeyLength(what: "\(spec) key", length: key.count, expected: [spec.keyLength])
        }
        self.spec = spec
        self.key = key

        // Build every context first, freeing the ones already made if a later one fails.
        var made: [OpaquePointer] = []
        func track(_ ctx: OpaquePointer) -> OpaquePointer {
            made.append(ctx)
            return ctx
        }
        do throws(CryptoError) {
            let half = spec.algorithm.keySize
            let mainEncrypt: OpaquePointer?
            let mainDecrypt: OpaquePointer
            var tweakEncrypt: OpaquePointer? = nil
            let engine: Engine
            switch spec.mode {
            case .ecb:
                engine = .ecb
                let ecb = Self.ecbCipher(spec.algorithm)
                mainEncrypt = track(try key.withUnsafeBytes { k throws(CryptoError) in
                    try Self.makeContext(ecb, key: k, encrypt: true) })
                mainDecrypt = track(try key.withUnsafeBytes { k throws(CryptoError) in
                    try Self.makeContext(ecb, key: k, encrypt: false) })
            case .cbc:
                engine = .evpPerSector
                let cipher = spec.evpCipher
                mainEncrypt = track(try key.withUnsafeBytes { k throws(CryptoError) in
                    try Self.makeContext(cipher, key: k, encrypt: true) })
                mainDecrypt = track(try key.withUnsafeBytes { k throws(CryptoError) in
                    try Self.makeContext(cipher, key: k, encrypt: false) })
            case .xts:
                let duplicate = key.withUnsafeBytes { k in
                    CRYPTO_memcmp(k.baseAddress, k.baseAddress.map { $0 + half }, half) == 0
                }
                if let cipher = spec.evpCipher {
                    engine = .evpPerSector
                    mainDecrypt = track(try key.withUnsafeBytes { k throws(CryptoError) in
                        try Self.makeContext(cipher, key: k, encrypt: false) })
                    mainEncrypt = duplicate ? nil : track(try key.withUnsafeBytes { k throws(CryptoError) in
                        try Self.makeContext(cipher, key: k, encrypt: true) })
                } else {
                    engine = .xtsFromECB
                    let ecb = Self.ecbCipher(spec.algorithm)
                    mainDecrypt = track(try key.withUnsafeBytes { k throws(CryptoError) in
                        try Self.makeContext(ecb, key: UnsafeRawBufferPointer(rebasing: k[0..<half]), encrypt: false) })
                    // Same policy as OpenSSL's XTS: no encryption with identical halves.
                    mainEncrypt = duplicate ? nil : track(try key.withUnsafeBytes { k throws(CryptoError) in
                        try Self.makeContext(ecb, key: UnsafeRawBufferPointer(rebasing: k[0..<half]), encrypt: true) })
                    tweakEncrypt = track(try key.withUnsafeBytes { k throws(CryptoError) in
                        try Self.makeContext(ecb, key: UnsafeRawBufferPointer(rebasing: k[half..<2 * half]), encrypt: true) })
                }
            }
            var essivEncrypt: OpaquePointer? = nil
            if spec.mode != .ecb, case .essiv(let hash) = spec.ivGenerator {
                // ESSIV: K' = hash(key); AES sized by the digest (sha256 → AES-256).
                guard let essivAlgorithm = CipherSpec.Algorithm(aesKeySize: hash.digestSize) else {
                    throw .unsupportedIVGenerator(spec.ivGenerator.description)
                }
                let essivKey = try hash.digestSecret(key)
                essivEncrypt = track(try essivKey.withUnsafeBytes { k throws(CryptoError) in
                    try Self.makeContext(Self.ecbCipher(essivAlgorithm), key: k, encrypt: true) })
            }
            self.engine = engine
            self.mainEncrypt = mainEncrypt
            self.mainDecrypt = mainDecrypt
            self.tweakEncrypt = tweakEncrypt
            self.essivEncrypt = essivEncrypt
        } catch {
            for ctx in made { EVP_CIPHER_CTX_free(ctx) }
            throw error
        }
        scratch = .allocate(byteCount: Self.scratchSize, alignment: 16)
        scratch.initializeMemory(as: UInt8.self, repeating: 0, count: Self.scratchSize)
    }

    deinit {
        for ctx in [mainEncrypt, mainDecrypt, tweakEncrypt, essivEncrypt] {
            if let ctx { EVP_CIPHER_CTX_free(ctx) }  // frees and cleanses the key schedule
        }
        OPENSSL_cleanse(scratch, Self.scratchSize)
        scratch.deallocate()
    }

    /// A new, independent instance with the same spec and key (own contexts), for use on
    /// another thread.
    public func makeCopy() throws(CryptoError) -> SectorCipher {
        try SectorCipher(spec: spec, key: key)
    }

    // MARK: - Public operations

    /// Encrypts `buffer` (a whole number of 512-byte sectors) in place; its first sector
    /// is sector number `firstSector`.
    public func encrypt(_ buffer: UnsafeMutableRawBufferPointer, firstSector: UInt64) throws(CryptoError) {
        try process(buffer, firstSector: firstSector, encrypt: true)
    }

    /// Decrypts `buffer` (a whole number of 512-byte sectors) in place; its first sector
    /// is sector number `firstSector`.
    public func decrypt(_ buffer: UnsafeMutableRawBufferPointer, firstSector: UInt64) throws(CryptoError) {
        try process(buffer, firstSector: firstSector, encrypt: false)
    }

    /// Encrypts an array of whole sectors in place.
    public func encrypt(_ bytes: inout [UInt8], firstSector: UInt64) throws(CryptoError) {
        try bytes.withMutableRawBytes { (buffer) throws(CryptoError) in
            try process(buffer, firstSector: firstSector, encrypt: true)
        }
    }

    /// Decrypts an array of whole sectors in place.
    public func decrypt(_ bytes: inout [UInt8], firstSector: UInt64) throws(CryptoError) {
        try bytes.withMutableRawBytes { (buffer) throws(CryptoError) in
            try process(buffer, firstSector: firstSector, encrypt: false)
        }
    }

    /// The 16-byte IV (XTS tweak input) this cipher uses for `sector`; empty for ECB.
    public func iv(forSector sector: UInt64) throws(CryptoError) -> [UInt8] {
        guard spec.mode != .ecb else { return [] }
        try generateIV(sector)
        return Array(UnsafeRawBufferPointer(start: scratch, count: 16))
    }

    // MARK: - Implementation

    private func process(_ buffer: UnsafeMutableRawBufferPointer, firstSector: UInt64, encrypt: Bool)
        throws(CryptoError)
    {
        guard buffer.count % Self.sectorSize == 0 else { throw .notSectorAligned(length: buffer.count) }
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let ctx: OpaquePointer
        if encrypt {
            guard let e = mainEncrypt else { throw .xtsDuplicateKeys }
            ctx = e
        } else {
            ctx = mainDecrypt
        }
        let sectors = buffer.count / Self.sectorSize
        switch engine {
        case .ecb:
            var done = 0
            while done < buffer.count {
                let chunk = min(buffer.count - done, 1 << 30)
                try Self.update(ctx, base + done, chunk, encrypt: encrypt)
                done += chunk
            }
        case .evpPerSector:
            let iv = scratch.assumingMemoryBound(to: UInt8.self)
            for i in 0..<sectors {
                try generateIV(firstSector &+ UInt64(i))
                let ok =
                    encrypt
                    ? EVP_EncryptInit_ex(ctx, nil, nil, nil, iv)
                    : EVP_DecryptInit_ex(ctx, nil, nil, nil, iv)
                guard ok == 1 else { throw openSSLError(encrypt ? "EVP_EncryptInit_ex" : "EVP_DecryptInit_ex") }
                try Self.update(ctx, base + i * Self.sectorSize, Self.sectorSize, encrypt: encrypt)
            }
        case .xtsFromECB:
            for i in 0..<sectors {
                try generateIV(firstSector &+ UInt64(i))
                try xtsSectorFromECB(base + i * Self.sectorSize, ctx: ctx, encrypt: encrypt)
            }
        }
    }

    /// Writes the IV for `sector` into `scratch[0..<16]`.
    private func generateIV(_ sector: UInt64) throws(CryptoError) {
        let iv = scratch
        switch spec.ivGenerator {
        case .plain:
            iv.storeBytes(of: UInt64(UInt32(truncatingIfNeeded: sector)).littleEndian, as: UInt64.self)
        case .plain64, .essiv:
            iv.storeBytes(of: sector.littleEndian, as: UInt64.self)
        }
        (iv + 8).storeBytes(of: 0, as: UInt64.self)
        if let essivEncrypt {
            try Self.update(essivEncrypt, iv, 16, encrypt: true)
        }
    }

    /// One XTS sector from ECB: T = E_K2(IV); C_j = E_K1(P_j ⊕ T_j) ⊕ T_j; T_{j+1} = T_j·α.
    private func xtsSectorFromECB(_ sector: UnsafeMutableRawPointer, ctx: OpaquePointer, encrypt: Bool)
        throws(CryptoError)
    {
        guard let tweakEncrypt else { throw .openSSL(operation: "XTS tweak", detail: "no tweak context") }
        let iv = scratch
        try Self.update(tweakEncrypt, iv, 16, encrypt: true)
        var lo = UInt64(littleEndian: iv.loadUnaligned(as: UInt64.self))
        var hi = UInt64(littleEndian: iv.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let tweaks = iv + 16
        for j in 0..<(Self.sectorSize / 16) {
            tweaks.storeBytes(of: lo.littleEndian, toByteOffset: 16 * j, as: UInt64.self)
            tweaks.storeBytes(of: hi.littleEndian, toByteOffset: 16 * j + 8, as: UInt64.self)
            let carry = hi >> 63
            hi = (hi << 1) | (lo >> 63)
            lo = (lo << 1) ^ (carry * 0x87)
        }
        xor(sector, tweaks)
        try Self.update(ctx, sector, Self.sectorSize, encrypt: encrypt)
        xor(sector, tweaks)
    }

    private func xor(_ data: UnsafeMutableRawPointer, _ tweaks: UnsafeMutableRawPointer) {
        for k in stride(from: 0, to: Self.sectorSize, by: 8) {
            let v = data.loadUnaligned(fromByteOffset: k, as: UInt64.self)
                ^ tweaks.loadUnaligned(fromByteOffset: k, as: UInt64.self)
            data.storeBytes(of: v, toByteOffset: k, as: UInt64.self)
        }
    }

    private static func update(_ ctx: OpaquePointer, _ p: UnsafeMutableRawPointer, _ count: Int, encrypt: Bool)
        throws(CryptoError)
    {
        var outLength: Int32 = 0
        let bytes = p.assumingMemoryBound(to: UInt8.self)
        let ok =
            encrypt
            ? EVP_EncryptUpdate(ctx, bytes, &outLength, bytes, Int32(count))
            : EVP_DecryptUpdate(ctx, bytes, &outLength, bytes, Int32(count))
        guard ok == 1, Int(outLength) == count else {
            throw openSSLError(encrypt ? "EVP_EncryptUpdate" : "EVP_DecryptUpdate")
        }
    }

    static func ecbCipher(_ algorithm: CipherSpec.Algorithm) -> OpaquePointer? {
        switch algorithm {
        case .aes128: EVP_aes_128_ecb()
        case .aes192: EVP_aes_192_ecb()
        case .aes256: EVP_aes_256_ecb()
        }
    }

    /// A new context keyed for one direction, padding off (sector data is block-aligned).
    static func makeContext(_ cipher: OpaquePointer?, key: UnsafeRawBufferPointer, encrypt: Bool)
        throws(CryptoError) -> OpaquePointer
    {
        guard let cipher else { throw .openSSL(operation: "cipher lookup", detail: "cipher not available") }
        guard Int(EVP_CIPHER_get_key_length(cipher)) == key.count else {
            throw .invalidKeyLength(
                what: "cipher key", length: key.count, expected: [Int(EVP_CIPHER_get_key_length(cipher))])
        }
        guard let ctx = EVP_CIPHER_CTX_new() else { throw openSSLError("EVP_CIPHER_CTX_new") }
        let k = key.baseAddress?.assumingMemoryBound(to: UInt8.self)
        let ok =
            encrypt
            ? EVP_EncryptInit_ex(ctx, cipher, nil, k, nil)
            : EVP_DecryptInit_ex(ctx, cipher, nil, k, nil)
        guard ok == 1, EVP_CIPHER_CTX_set_padding(ctx, 0) == 1 else {
            let error = openSSLError(encrypt ? "EVP_EncryptInit_ex" : "EVP_DecryptInit_ex")
            EVP_CIPHER_CTX_free(ctx)
            throw error
        }
        return ctx
    }
}

/// A thread-safe source of ``SectorCipher`` instances sharing one key: checks an idle
/// instance out for the duration of a closure (creating one if none is idle) and puts it
/// back afterwards, keeping at most `maximumIdle` idle instances.
///
/// Use this from an engine whose reads and writes run on several threads. Creating an
/// instance costs a key schedule (microseconds), so the pool mainly avoids that per call.
public final class SectorCipherPool: Sendable {
    /// The cipher, mode and IV generator.
    public let spec: CipherSpec
    private let key: SecretBytes
    private let maximumIdle: Int
    private let idle: Mutex<[Handle]>

    /// Lets idle instances sit in the mutex: each is only ever used by the one thread that
    /// checked it out.
    private struct Handle: @unchecked Sendable {
        let cipher: SectorCipher
    }

    /// A pool for `spec` and `key`. Creates one instance eagerly, so a bad key or spec
    /// fails here.
    public init(spec: CipherSpec, key: SecretBytes, maximumIdle: Int = 16) throws(CryptoError) {
        let first = try SectorCipher(spec: spec, key: key)
        self.spec = spec
        self.key = key
        self.maximumIdle = max(1, maximumIdle)
        self.idle = Mutex([Handle(cipher: first)])
    }

    /// Runs `body` with a cipher no other thread is using. Rethrows `body`'s errors; throws
    /// a ``CryptoError`` if a new instance cannot be created.
    public func withCipher<R>(_ body: (SectorCipher) throws -> R) throws -> R {
        let cipher: SectorCipher
        if let handle = idle.withLock({ $0.popLast() }) {
            cipher = handle.cipher
        } else {
            cipher = try SectorCipher(spec: spec, key: key)
        }
        defer {
            let handle = Handle(cipher: cipher)
            idle.withLock { list in
                if list.count < maximumIdle { list.append(handle) }
            }
        }
        return try body(cipher)
    }

    /// Encrypts whole sectors in place (see ``SectorCipher``).
    public func encrypt(_ buffer: UnsafeMutableRawBufferPointer, firstSector: UInt64) throws(CryptoError) {
        try run { c in try c.encrypt(buffer, firstSector: firstSector) }
    }

    /// Decrypts whole sectors in place.
    public func decrypt(_ buffer: UnsafeMutableRawBufferPointer, firstSector: UInt64) throws(CryptoError) {
        try run { c in try c.decrypt(buffer, firstSector: firstSector) }
    }

    private func run(_ body: (SectorCipher) throws -> Void) throws(CryptoError) {
        do {
            try withCipher(body)
        } catch let error as CryptoError {
            throw error
        } catch {
            throw .openSSL(operation: "cipher pool", detail: "\(error)")
        }
    }
}
