import COpenSSL

/// How expensive new PBKDF2 derivations (key slots, master-key digest) are made.
public enum PBKDF2Cost: Sendable, Equatable {
    /// QEMU's `encrypt.iter-time` (milliseconds, default 2000): benchmark PBKDF2 on this
    /// machine (``PBKDF2/iterationsPerSecond(hash:passwordLength:saltLength:keyLength:)``,
    /// about 0.5–1 s per benchmark) and scale. Slot iterations = rate × time; master-key
    /// digest iterations = rate × time / 8; each at least 1000.
    case iterTime(milliseconds: UInt64)
    /// Exactly this many iterations for slots and the master-key digest (reproducible
    /// images and fast tests). Must be ≥ 1; QEMU reads any positive count.
    case iterations(UInt32)

    /// QEMU's default: 2000 ms.
    public static let qemuDefault = PBKDF2Cost.iterTime(milliseconds: 2000)
}

/// A successfully opened LUKS header.
public struct LUKS1Unlocked {
    /// The master key (wiped when the last reference goes away).
    public let masterKey: SecretBytes
    /// The key slot that opened.
    public let keySlot: Int
    /// A payload cipher keyed with the master key (use from one thread at a time; see
    /// ``makeCipherPool()``).
    public let cipher: SectorCipher

    /// A thread-safe pool of payload ciphers with the master key.
    public func makeCipherPool() throws(CryptoError) -> SectorCipherPool {
        try SectorCipherPool(spec: cipher.spec, key: masterKey)
    }
}

/// Bytes to write into the LUKS area: key material for a slot, or garbage over an erased
/// slot's material.
public struct LUKS1KeyMaterialWrite: Sendable, Equatable {
    /// The key slot concerned.
    public let slot: Int
    /// Byte offset within the LUKS area.
    public let offset: UInt64
    /// The bytes (encrypted AF material, or random garbage; never plaintext key data).
    public let bytes: [UInt8]
}

/// Parameters of a new LUKS header. Defaults are QEMU's.
public struct LUKS1CreateOptions: Sendable, Equatable {
    /// Payload cipher (`aes-256-xts-plain64`).
    public var cipher: CipherSpec
    /// PBKDF2 and AF hash (`sha256`).
    public var hash: HashAlgorithm
    /// Iteration policy (`iter-time` 2000 ms).
    public var cost: PBKDF2Cost
    /// UUID to store; nil generates a random (version 4) one like QEMU.
    public var uuid: String?

    /// Options; every argument defaults to QEMU's choice.
    public init(
        cipher: CipherSpec = .qemuDefault, hash: HashAlgorithm = .sha256, cost: PBKDF2Cost = .qemuDefault,
        uuid: String? = nil
    ) {
        self.cipher = cipher
        self.hash = hash
        self.cost = cost
        self.uuid = uuid
    }
}

/// A new LUKS header and the bytes to store for it.
public struct LUKS1Created {
    /// The header (slot 0 active).
    public let header: LUKS1Header
    /// The random master key.
    public let masterKey: SecretBytes
    /// Slot 0's encrypted key material.
    public let keyMaterial: LUKS1KeyMaterialWrite

    /// Length of the LUKS area: `payload_offset × 512` (what the FDE extension records and
    /// what QEMU allocates, rounded up to clusters).
    public var areaLength: UInt64 { UInt64(header.payloadOffset) * UInt64(LUKS1Header.sectorSize) }

    /// The whole LUKS area as QEMU lays it out: the header at 0, zeros to 4096, slot 0's
    /// key material at its offset, zeros elsewhere.
    public func areaBytes() -> [UInt8] {
        var area = [UInt8](repeating: 0, count: Int(areaLength))
        let header = header.serialized()
        area.replaceSubrange(0..<header.count, with: header)
        let start = Int(keyMaterial.offset)
        area.replaceSubrange(start..<(start + keyMaterial.bytes.count), with: keyMaterial.bytes)
        return area
    }

    /// A payload cipher keyed with the master key.
    public func makeCipher() throws(CryptoError) -> SectorCipher {
        try SectorCipher(spec: header.cipher, key: masterKey)
    }
}

extension LUKS1Header {
    /// Reads `length` bytes at `offset` (bytes, relative to the LUKS area start).
    public typealias KeyMaterialReader = (_ offset: UInt64, _ length: Int) throws -> [UInt8]

    // MARK: - Unlock

    /// Opens the header with `passphrase`: tries each active slot in order (as QEMU does),
    /// derives the slot key with PBKDF2, reads and decrypts the slot's key material
    /// (sector numbers from 0), AF-merges it and checks the master-key digest.
    ///
    /// - Parameters:
    ///   - passphrase: the secret's bytes (QEMU uses the UTF-8 secret up to its first NUL).
    ///   - readKeyMaterial: reads from the LUKS area; called with offsets and lengths that
    ///     this header validated against ``areaLength`` (at most 4 MiB). Its errors are
    ///     rethrown unchanged.
    /// - Throws: ``CryptoError/invalidPassphrase`` if no slot opens; other ``CryptoError``s
    ///   for unusable key material; whatever `readKeyMaterial` throws.
    public func unlock(passphrase: [UInt8], readKeyMaterial: KeyMaterialReader) throws -> LUKS1Unlocked {
        for index in activeKeySlots {
            if let masterKey = try openKeySlot(index, passphrase: passphrase, readKeyMaterial: readKeyMaterial) {
                return LUKS1Unlocked(
                    masterKey: masterKey, keySlot: index, cipher: try SectorCipher(spec: cipher, key: masterKey))
            }
        }
        throw CryptoError.invalidPassphrase
    }

    /// The master key from one slot, or nil if the slot is inactive or `passphrase` does
    /// not open it.
    public func openKeySlot(_ index: Int, passphrase: [UInt8], readKeyMaterial: KeyMaterialReader) throws
        -> SecretBytes?
    {
        guard keySlots.indices.contains(index) else {
            throw CryptoError.invalidParameter("key slot index \(index) (must be 0…\(Self.keySlotCount - 1))")
        }
        let slot = keySlots[index]
        guard slot.isActive else { return nil }
        let slotKey = try PBKDF2.deriveSecret(
            password: passphrase, salt: slot.salt, iterations: Int(slot.iterations), hash: hash,
            keyLength: Int(keyBytes))
        let length = slot.keyMaterialLength(keyBytes: keyBytes)
        let stored = slot.storedKeyMaterialLength(keyBytes: keyBytes)
        var material = try readKeyMaterial(slot.keyMaterialByteOffset, stored)
        defer { wipe(&material) }
        guard material.count == stored else {
            throw CryptoError.keyMaterialShortRead(slot: index, expected: stored, got: material.count)
        }
        try SectorCipher(spec: cipher, key: slotKey).decrypt(&material, firstSector: 0)
        let candidate = try material.withUnsafeBytes { (m) throws(CryptoError) in
            try AFSplitter.mergeSecret(
                material: UnsafeRawBufferPointer(rebasing: m[0..<length]), keyLength: Int(keyBytes),
                stripes: Int(slot.stripes), hash: hash)
        }
        return try verifyMasterKey(candidate) ? candidate : nil
    }

    /// The active slots `passphrase` opens (for erasing keys by their passphrase, as
    /// `qemu-img amend -o encrypt.state=inactive,encrypt.old-secret=…` does).
    public func keySlots(openedBy passphrase: [UInt8], readKeyMaterial: KeyMaterialReader) throws -> [Int] {
        try activeKeySlots.filter {
            try openKeySlot($0, passphrase: passphrase, readKeyMaterial: readKeyMaterial) != nil
        }
    }

    /// Whether `masterKey` matches the header's master-key digest (constant-time compare).
    public func verifyMasterKey(_ masterKey: SecretBytes) throws(CryptoError) -> Bool {
        guard masterKey.count == Int(keyBytes) else { return false }
        let digest = try masterKey.withUnsafeBytes { (mk) throws(CryptoError) in
            try masterKeyDigestSalt.withRawBytes { (salt) throws(CryptoError) in
                try PBKDF2.deriveSecret(
                    password: mk, salt: salt, iterations: Int(masterKeyDigestIterations), hash: hash,
                    keyLength: Self.digestLength)
            }
        }
        return digest.withUnsafeBytes { d in
            masterKeyDigest.withUnsafeBytes { expected in
                CRYPTO_memcmp(d.baseAddress, expected.baseAddress, Self.digestLength) == 0
            }
        }
    }

    // MARK: - Create

    /// Creates a header for a new random master key (or `masterKey`), with `passphrase` in
    /// slot 0, following QEMU's `qcrypto_block_luks_create`: random 32-byte salts, digest
    /// iterations = slot rate × time / 8 (≥ 1000), slot iterations = rate × time (≥ 1000),
    /// 4000 stripes, QEMU's key-material layout. Disabled slots have zero salt and
    /// iterations.
    ///
    /// Write ``LUKS1Created/areaBytes()`` (or the header at 0 and the key material at its
    /// offset over a zeroed area of ``LUKS1Created/areaLength`` bytes).
    public static func create(
        passphrase: [UInt8], options: LUKS1CreateOptions = LUKS1CreateOptions(), masterKey givenKey: SecretBytes? = nil
    ) throws(CryptoError) -> LUKS1Created {
        let spec = options.cipher
        let hash = options.hash
        guard hash.isAvailable else { throw .unsupportedHash(hash.name) }
        // QEMU encrypts key material in whole sectors and aborts when key_bytes × 4000 is
        // not a multiple of 512 (24-byte keys: aes-192 in cbc/ecb); refuse to make such images.
        guard spec.keyLength * Int(defaultStripes) % sectorSize == 0 else {
            throw .invalidParameter(
                "\(spec) gives \(spec.keyLength * Int(defaultStripes)) bytes of LUKS key material, "
                    + "not whole 512-byte sectors; QEMU cannot open such images")
        }
        let masterKey: SecretBytes
        if let givenKey { masterKey = givenKey } else { masterKey = try generateMasterKey(for: spec) }
        guard masterKey.count == spec.keyLength else {
            throw .invalidKeyLength(what: "master key", length: masterKey.count, expected: [spec.keyLength])
        }
        let digestSalt = try secureRandomBytes(saltLength)
        let digestIterations: UInt32
        switch options.cost {
        case .iterations(let n):
            guard n >= 1 else { throw .invalidParameter("PBKDF2 iteration count 0") }
            digestIterations = n
        case .iterTime(let milliseconds):
            let rate = try PBKDF2.iterationsPerSecond(
                hash: hash, passwordLength: spec.keyLength, saltLength: saltLength, keyLength: digestLength)
            digestIterations = try scaledIterations(rate: rate, milliseconds: milliseconds, divisor: 8)
        }
        let digest = try masterKey.withUnsafeBytes { (mk) throws(CryptoError) in
            try digestSalt.withRawBytes { (salt) throws(CryptoError) in
                try PBKDF2.deriveSecret(
                    password: mk, salt: salt, iterations: Int(digestIterations), hash: hash, keyLength: digestLength)
            }
        }
        let uuid: String
        if let given = options.uuid { uuid = given } else { uuid = try randomUUID() }
        var header = try LUKS1Header(
            cipher: spec, hash: hash, masterKeyDigest: digest.bytes, masterKeyDigestSalt: digestSalt,
            masterKeyDigestIterations: digestIterations, uuid: uuid)
        let write = try header.storeKey(in: 0, passphrase: passphrase, masterKey: masterKey, cost: options.cost)
        return LUKS1Created(header: header, masterKey: masterKey, keyMaterial: write)
    }

    // MARK: - Amend

    /// Adds `passphrase` as a new key for `masterKey` (QEMU's `qemu-img amend -o
    /// encrypt.state=active,encrypt.new-secret=…[,encrypt.keyslot=N]`): into `slot`, or the
    /// first inactive slot. Write the returned key material first, then ``serialized()``
    /// (QEMU's order).
    ///
    /// - Throws: ``CryptoError/masterKeyMismatch`` if `masterKey` fails the digest,
    ///   ``CryptoError/keySlotActive(_:)``, ``CryptoError/noFreeKeySlot``.
    public mutating func addKeySlot(
        passphrase: [UInt8], masterKey: SecretBytes, slot: Int? = nil, cost: PBKDF2Cost = .qemuDefault
    ) throws(CryptoError) -> LUKS1KeyMaterialWrite {
        guard try verifyMasterKey(masterKey) else { throw .masterKeyMismatch }
        let index: Int
        if let slot {
            guard keySlots.indices.contains(slot) else {
                throw .invalidParameter("key slot index \(slot) (must be 0…\(Self.keySlotCount - 1))")
            }
            guard !keySlots[slot].isActive else { throw .keySlotActive(slot) }
            index = slot
        } else {
            guard let free = keySlots.firstIndex(where: { !$0.isActive }) else { throw .noFreeKeySlot }
            index = free
        }
        return try storeKey(in: index, passphrase: passphrase, masterKey: masterKey, cost: cost)
    }

    /// Erases key slot `index` (QEMU's `qcrypto_block_luks_erase_key`): the slot becomes
    /// disabled with zero salt and iterations, and the returned write overwrites its key
    /// material with random bytes. Write ``serialized()`` first, then the garbage (QEMU's
    /// order).
    ///
    /// - Parameter allowErasingLastSlot: QEMU's `force`; without it, erasing the only
    ///   active slot throws ``CryptoError/lastActiveKeySlot(_:)``.
    public mutating func eraseKeySlot(_ index: Int, allowErasingLastSlot: Bool = false) throws(CryptoError)
        -> LUKS1KeyMaterialWrite
    {
        guard keySlots.indices.contains(index) else {
            throw .invalidParameter("key slot index \(index) (must be 0…\(Self.keySlotCount - 1))")
        }
        var slot = keySlots[index]
        guard slot.isActive else { throw .keySlotInactive(index) }
        guard allowErasingLastSlot || activeKeySlots.count > 1 else { throw .lastActiveKeySlot(index) }
        let garbage = try secureRandomBytes(slot.keyMaterialLength(keyBytes: keyBytes))
        slot.isActive = false
        slot.iterations = 0
        slot.salt = [UInt8](repeating: 0, count: Self.saltLength)
        setSlot(index, slot)
        return LUKS1KeyMaterialWrite(slot: index, offset: slot.keyMaterialByteOffset, bytes: garbage)
    }

    /// QEMU's `qcrypto_block_luks_store_key`: new salt and iterations, slot key by PBKDF2,
    /// AF-split master key encrypted with the slot key (sectors from 0).
    private mutating func storeKey(in index: Int, passphrase: [UInt8], masterKey: SecretBytes, cost: PBKDF2Cost)
        throws(CryptoError) -> LUKS1KeyMaterialWrite
    {
        var slot = keySlots[index]
        let salt = try secureRandomBytes(Self.saltLength)
        let iterations: UInt32
        switch cost {
        case .iterations(let n):
            guard n >= 1 else { throw .invalidParameter("PBKDF2 iteration count 0") }
            iterations = n
        case .iterTime(let milliseconds):
            let rate = try PBKDF2.iterationsPerSecond(
                hash: hash, passwordLength: passphrase.count, saltLength: Self.saltLength, keyLength: Int(keyBytes))
            iterations = try Self.scaledIterations(rate: rate, milliseconds: milliseconds, divisor: 1)
        }
        let slotKey = try PBKDF2.deriveSecret(
            password: passphrase, salt: salt, iterations: Int(iterations), hash: hash, keyLength: Int(keyBytes))
        var material = try AFSplitter.split(key: masterKey, stripes: Int(slot.stripes), hash: hash)
        defer { wipe(&material) }
        // Whole sectors (always the case with 4000 stripes); an odd tail is random padding.
        let stored = slot.storedKeyMaterialLength(keyBytes: keyBytes)
        var buffer = [UInt8](repeating: 0, count: stored)
        var encrypted = false
        defer { if !encrypted { wipe(&buffer) } }
        buffer.replaceSubrange(0..<material.count, with: material)
        if stored > material.count {
            let tail = try secureRandomBytes(stored - material.count)
            buffer.replaceSubrange(material.count..<stored, with: tail)
        }
        try SectorCipher(spec: cipher, key: slotKey).encrypt(&buffer, firstSector: 0)
        encrypted = true
        slot.isActive = true
        slot.iterations = iterations
        slot.salt = salt
        setSlot(index, slot)
        return LUKS1KeyMaterialWrite(slot: index, offset: slot.keyMaterialByteOffset, bytes: buffer)
    }

    /// rate (iterations/s) × milliseconds / 1000 / divisor, at least 1000, at most what
    /// libcrypto accepts; QEMU fails the same way on overflow.
    static func scaledIterations(rate: UInt64, milliseconds: UInt64, divisor: UInt64) throws(CryptoError) -> UInt32 {
        guard milliseconds >= 1 else { throw .invalidParameter("iter-time must be at least 1 ms") }
        guard rate <= UInt64.max / milliseconds else {
            throw .invalidParameter("PBKDF2 iteration count overflows for iter-time \(milliseconds) ms")
        }
        let iterations = rate * milliseconds / 1000 / divisor
        guard iterations <= UInt64(Int32.max) else {
            throw .invalidParameter("too many PBKDF2 iterations (\(iterations)) for iter-time \(milliseconds) ms")
        }
        return max(UInt32(iterations), minimumIterations)
    }

    /// A random master key of the spec's length; XTS keys with identical halves (which
    /// OpenSSL refuses) are redrawn.
    static func generateMasterKey(for spec: CipherSpec) throws(CryptoError) -> SecretBytes {
        while true {
            let key = try SecretBytes.random(count: spec.keyLength)
            guard spec.mode == .xts else { return key }
            let half = spec.keyLength / 2
            let duplicate = key.withUnsafeBytes { k in
                CRYPTO_memcmp(k.baseAddress, k.baseAddress.map { $0 + half }, half) == 0
            }
            if !duplicate { return key }
        }
    }

    /// A random version-4 UUID, lower-case (QEMU's `qemu_uuid_unparse`).
    static func randomUUID() throws(CryptoError) -> String {
        var b = try secureRandomBytes(16)
        b[6] = (b[6] & 0x0F) | 0x40
        b[8] = (b[8] & 0x3F) | 0x80
        let hex = b.map { byte -> String in
            let s = String(byte, radix: 16)
            return s.count == 1 ? "0" + s : s
        }
        return [hex[0..<4], hex[4..<6], hex[6..<8], hex[8..<10], hex[10..<16]]
            .map { $0.joined() }.joined(separator: "-")
    }
}
