import COpenSSL

/// A LUKS1 partition header, as stored at the start of a qcow2 image's LUKS area (the
/// area the full-disk-encryption header extension 0x0537BE77 points at).
///
/// ```
///   0   6  magic "LUKS\xBA\xBE"          104  4  payload_offset (sectors)
///   6   2  version = 1                    108  4  key_bytes
///   8  32  cipher_name  ("aes")           112 20  mk_digest
///  40  32  cipher_mode  ("xts-plain64")   132 32  mk_digest_salt
///  72  32  hash_spec    ("sha256")        164  4  mk_digest_iter
///                                         168 40  uuid (ASCII, NUL-padded)
/// 208 + 48·i: key slot i (i = 0…7)
///   +0 4 active (0x00AC71F3 / 0x0000DEAD)  +4 4 iterations  +8 32 salt
///  +40 4 key_material_offset (sectors)    +44 4 stripes
/// ```
///
/// All integers are big-endian; strings are NUL-padded and must contain a NUL. All
/// offsets are relative to the start of the LUKS area, in 512-byte sectors.
///
/// Parsing validates everything QEMU's `qcrypto_block_luks_check_header` validates, plus
/// that every slot's key material lies inside the area. The type is pure: it never does
/// I/O; ``unlock(passphrase:readKeyMaterial:)`` reads key material through a closure.
public struct LUKS1Header: Sendable, Equatable {
    /// Size of the on-disk header: 592 bytes.
    public static let byteCount = 592
    /// `"LUKS\xBA\xBE"`.
    public static let magic: [UInt8] = [0x4C, 0x55, 0x4B, 0x53, 0xBA, 0xBE]
    /// The only version QEMU's qcow2 driver supports.
    public static let version: UInt16 = 1
    /// Number of key slots.
    public static let keySlotCount = 8
    /// LUKS sector size: offsets are in these units.
    public static let sectorSize = 512
    /// Length of salts (slots and master-key digest).
    public static let saltLength = 32
    /// Length of the master-key digest.
    public static let digestLength = 20
    /// Stripes used by QEMU and cryptsetup; QEMU refuses any other value.
    public static let defaultStripes: UInt32 = 4000
    /// Key material starts at or after 4096 bytes (8 sectors): the header's own space.
    public static let headerSectors: UInt32 = 8
    /// QEMU's minimum PBKDF2 iterations for slots and the master-key digest.
    public static let minimumIterations: UInt32 = 1000

    private static let stringFieldLength = 32
    private static let uuidFieldLength = 40
    private static let keySlotsOffset = 208
    private static let keySlotSize = 48

    /// One of the eight key slots.
    public struct KeySlot: Sendable, Equatable {
        /// On-disk marker of an enabled slot.
        public static let enabledMarker: UInt32 = 0x00AC_71F3
        /// On-disk marker of a disabled slot.
        public static let disabledMarker: UInt32 = 0x0000_DEAD

        /// Whether the slot holds a key.
        public internal(set) var isActive: Bool
        /// PBKDF2 iterations for the slot key (0 in QEMU's disabled slots).
        public internal(set) var iterations: UInt32
        /// PBKDF2 salt (32 bytes; zeros in QEMU's disabled slots).
        public internal(set) var salt: [UInt8]
        /// Start of the slot's key material, in 512-byte sectors from the LUKS area start.
        public internal(set) var keyMaterialOffset: UInt32
        /// AF stripes (4000).
        public internal(set) var stripes: UInt32

        /// Byte offset of the key material within the LUKS area.
        public var keyMaterialByteOffset: UInt64 { UInt64(keyMaterialOffset) * UInt64(LUKS1Header.sectorSize) }

        /// Bytes of AF material: `keyBytes × stripes`.
        public func keyMaterialLength(keyBytes: UInt32) -> Int { Int(keyBytes) * Int(stripes) }

        /// Bytes of key material as stored: rounded up to whole sectors.
        public func storedKeyMaterialLength(keyBytes: UInt32) -> Int {
            roundUp(keyMaterialLength(keyBytes: keyBytes), LUKS1Header.sectorSize)
        }
    }

    private var cipherNameField: [UInt8]
    private var cipherModeField: [UInt8]
    private var hashSpecField: [UInt8]
    private var uuidField: [UInt8]

    /// `payload_offset` in sectors (QEMU: the LUKS area's length / 512; qcow2 ignores it
    /// for data placement).
    public private(set) var payloadOffset: UInt32
    /// `key_bytes`: the master key length (64 for aes-256-xts).
    public private(set) var keyBytes: UInt32
    /// PBKDF2(master key) with the digest salt and iterations, 20 bytes.
    public private(set) var masterKeyDigest: [UInt8]
    /// Salt of the master-key digest (32 bytes).
    public private(set) var masterKeyDigestSalt: [UInt8]
    /// Iterations of the master-key digest.
    public private(set) var masterKeyDigestIterations: UInt32
    /// The eight key slots.
    public private(set) var keySlots: [KeySlot]

    /// The payload cipher (from `cipher_name`, `cipher_mode` and `key_bytes`).
    public let cipher: CipherSpec
    /// The PBKDF2 / AF hash (from `hash_spec`).
    public let hash: HashAlgorithm
    /// The length of the LUKS area this header was validated against (bytes); key material
    /// is never read beyond it.
    public let areaLength: UInt64

    /// `cipher_name` (`aes`).
    public var cipherName: String { Self.string(cipherNameField) }
    /// `cipher_mode` (`xts-plain64`).
    public var cipherMode: String { Self.string(cipherModeField) }
    /// `hash_spec` (`sha256`).
    public var hashSpec: String { Self.string(hashSpecField) }
    /// The UUID string.
    public var uuid: String { Self.string(uuidField) }
    /// Indices of the active key slots.
    public var activeKeySlots: [Int] { keySlots.indices.filter { keySlots[$0].isActive } }

    // MARK: - Parsing

    /// Parses and validates a header.
    ///
    /// - Parameters:
    ///   - bytes: at least the first 592 bytes of the LUKS area (more is ignored).
    ///   - areaLength: the LUKS area's length in bytes (the FDE extension's length field);
    ///     every key slot's material must lie inside it.
    public init(parsing bytes: [UInt8], areaLength: UInt64) throws(CryptoError) {
        guard bytes.count >= Self.byteCount else {
            throw .malformedHeader("header is \(bytes.count) bytes, need \(Self.byteCount)")
        }
        guard areaLength >= UInt64(Self.byteCount) else {
            throw .malformedHeader("LUKS area of \(areaLength) bytes cannot hold the \(Self.byteCount)-byte header")
        }
        guard Array(bytes[0..<6]) == Self.magic else {
            throw .malformedHeader("bad magic (not a LUKS header)")
        }
        let version = UInt16(bytes[6]) << 8 | UInt16(bytes[7])
        guard version == Self.version else {
            throw .malformedHeader("LUKS version \(version) is not supported (only LUKS1)")
        }
        func field(_ offset: Int, _ length: Int, _ name: String) throws(CryptoError) -> [UInt8] {
            let f = Array(bytes[offset..<(offset + length)])
            guard f.contains(0) else { throw .malformedHeader("\(name) is not NUL-terminated") }
            return f
        }
        func u32(_ offset: Int) -> UInt32 {
            UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16 | UInt32(bytes[offset + 2]) << 8
                | UInt32(bytes[offset + 3])
        }
        cipherNameField = try field(8, Self.stringFieldLength, "cipher_name")
        cipherModeField = try field(40, Self.stringFieldLength, "cipher_mode")
        hashSpecField = try field(72, Self.stringFieldLength, "hash_spec")
        payloadOffset = u32(104)
        keyBytes = u32(108)
        masterKeyDigest = Array(bytes[112..<132])
        masterKeyDigestSalt = Array(bytes[132..<164])
        masterKeyDigestIterations = u32(164)
        uuidField = Array(bytes[168..<208])
        var slots: [KeySlot] = []
        for i in 0..<Self.keySlotCount {
            let o = Self.keySlotsOffset + i * Self.keySlotSize
            let marker = u32(o)
            guard marker == KeySlot.enabledMarker || marker == KeySlot.disabledMarker else {
                throw .invalidKeySlot(slot: i, reason: "state marker is neither active nor disabled")
            }
            slots.append(
                KeySlot(
                    isActive: marker == KeySlot.enabledMarker, iterations: u32(o + 4),
                    salt: Array(bytes[(o + 8)..<(o + 40)]), keyMaterialOffset: u32(o + 40), stripes: u32(o + 44)))
        }
        keySlots = slots

        let hashName = Self.string(hashSpecField)
        guard let hash = HashAlgorithm(name: hashName) else { throw .unsupportedHash(hashName) }
        guard hash.isAvailable else { throw .unsupportedHash(hashName) }
        self.hash = hash
        guard keyBytes <= 1024 else {
            throw .invalidKeyLength(what: "LUKS key_bytes", length: Int(keyBytes), expected: [16, 24, 32, 48, 64])
        }
        cipher = try CipherSpec(
            luksCipherName: Self.string(cipherNameField), luksCipherMode: Self.string(cipherModeField),
            keyBytes: Int(keyBytes))
        self.areaLength = areaLength
        try validate()
    }

    /// Geometry and parameter checks (QEMU's `qcrypto_block_luks_check_header`, plus area
    /// bounds and iteration limits).
    private func validate() throws(CryptoError) {
        guard masterKeyDigestIterations >= 1, masterKeyDigestIterations <= UInt32(Int32.max) else {
            throw .malformedHeader("master-key digest iteration count \(masterKeyDigestIterations) is out of range")
        }
        let sector = UInt64(Self.sectorSize)
        var ranges: [(start: UInt64, end: UInt64)] = []  // in sectors, QEMU's rounding
        for (i, slot) in keySlots.enumerated() {
            guard slot.stripes >= 1, slot.stripes <= UInt32(AFSplitter.maximumStripes) else {
                throw .invalidKeySlot(slot: i, reason: "stripe count \(slot.stripes) is out of range")
            }
            if slot.isActive {
                guard slot.iterations >= 1 else { throw .invalidKeySlot(slot: i, reason: "iteration count is zero") }
                guard slot.iterations <= UInt32(Int32.max) else {
                    throw .invalidKeySlot(slot: i, reason: "iteration count \(slot.iterations) is too large")
                }
            }
            let start = UInt64(slot.keyMaterialOffset)
            let materialSectors = (UInt64(keyBytes) * UInt64(slot.stripes) + sector - 1) / sector
            let span = roundUp(materialSectors, UInt64(Self.headerSectors))
            guard start >= UInt64(Self.headerSectors) else {
                throw .invalidKeySlot(slot: i, reason: "key material at sector \(start) overlaps the LUKS header")
            }
            guard start + span <= UInt64(payloadOffset) else {
                throw .invalidKeySlot(
                    slot: i,
                    reason: "key material (sectors \(start)..<\(start + span)) overlaps the payload at sector \(payloadOffset)")
            }
            guard (start + materialSectors) * sector <= areaLength else {
                throw .invalidKeySlot(
                    slot: i,
                    reason: "key material (bytes \(start * sector)..<\((start + materialSectors) * sector)) "
                        + "lies outside the \(areaLength)-byte LUKS area")
            }
            for (j, other) in ranges.enumerated() where start + span > other.start && other.end > start {
                throw .malformedHeader("key slots \(j) and \(i) overlap")
            }
            ranges.append((start, start + span))
        }
    }

    // MARK: - Serialization

    /// The 592-byte on-disk header.
    public func serialized() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Self.byteCount)
        func put(_ bytes: [UInt8], at offset: Int) {
            for (i, b) in bytes.enumerated() { out[offset + i] = b }
        }
        func put32(_ v: UInt32, at offset: Int) {
            put([UInt8(v >> 24), UInt8(truncatingIfNeeded: v >> 16), UInt8(truncatingIfNeeded: v >> 8),
                 UInt8(truncatingIfNeeded: v)], at: offset)
        }
        put(Self.magic, at: 0)
        put([UInt8(Self.version >> 8), UInt8(truncatingIfNeeded: Self.version)], at: 6)
        put(cipherNameField, at: 8)
        put(cipherModeField, at: 40)
        put(hashSpecField, at: 72)
        put32(payloadOffset, at: 104)
        put32(keyBytes, at: 108)
        put(masterKeyDigest, at: 112)
        put(masterKeyDigestSalt, at: 132)
        put32(masterKeyDigestIterations, at: 164)
        put(uuidField, at: 168)
        for (i, slot) in keySlots.enumerated() {
            let o = Self.keySlotsOffset + i * Self.keySlotSize
            put32(slot.isActive ? KeySlot.enabledMarker : KeySlot.disabledMarker, at: o)
            put32(slot.iterations, at: o + 4)
            put(slot.salt, at: o + 8)
            put32(slot.keyMaterialOffset, at: o + 40)
            put32(slot.stripes, at: o + 44)
        }
        return out
    }

    // MARK: - Building (used by create)

    /// A header from explicit values (QEMU's layout); validated like a parsed one.
    init(
        cipher: CipherSpec, hash: HashAlgorithm, masterKeyDigest: [UInt8], masterKeyDigestSalt: [UInt8],
        masterKeyDigestIterations: UInt32, uuid: String
    ) throws(CryptoError) {
        let keyBytes = UInt32(cipher.keyLength)
        let geometry = Self.qemuGeometry(keyBytes: keyBytes)
        self.cipherNameField = try Self.field(cipher.luksCipherName, length: Self.stringFieldLength)
        self.cipherModeField = try Self.field(cipher.luksCipherMode, length: Self.stringFieldLength)
        self.hashSpecField = try Self.field(hash.name, length: Self.stringFieldLength)
        self.uuidField = try Self.field(uuid, length: Self.uuidFieldLength)
        self.payloadOffset = geometry.payloadOffset
        self.keyBytes = keyBytes
        self.masterKeyDigest = masterKeyDigest
        self.masterKeyDigestSalt = masterKeyDigestSalt
        self.masterKeyDigestIterations = masterKeyDigestIterations
        self.keySlots = geometry.slotOffsets.map { offset in
            KeySlot(
                isActive: false, iterations: 0, salt: [UInt8](repeating: 0, count: Self.saltLength),
                keyMaterialOffset: offset, stripes: Self.defaultStripes)
        }
        self.cipher = cipher
        self.hash = hash
        self.areaLength = UInt64(geometry.payloadOffset) * UInt64(Self.sectorSize)
        try validate()
    }

    /// QEMU's (= cryptsetup's) key-material layout for `keyBytes` and 4000 stripes:
    /// slot i at `8 + i·round_up(km_sectors, 8)` sectors, payload after the eighth slot.
    static func qemuGeometry(keyBytes: UInt32) -> (slotOffsets: [UInt32], payloadOffset: UInt32) {
        let kmSectors = (Int(keyBytes) * Int(defaultStripes) + sectorSize - 1) / sectorSize
        let span = roundUp(kmSectors, Int(headerSectors))
        let offsets = (0..<keySlotCount).map { UInt32(Int(headerSectors) + $0 * span) }
        return (offsets, UInt32(Int(headerSectors) + keySlotCount * span))
    }

    mutating func setSlot(_ index: Int, _ slot: KeySlot) {
        keySlots[index] = slot
    }

    private static func field(_ s: String, length: Int) throws(CryptoError) -> [UInt8] {
        let bytes = Array(s.utf8)
        guard bytes.count < length else { throw .invalidParameter("'\(s)' does not fit a \(length)-byte header field") }
        return bytes + [UInt8](repeating: 0, count: length - bytes.count)
    }

    private static func string(_ field: [UInt8]) -> String {
        String(decoding: field.prefix { $0 != 0 }, as: UTF8.self)
    }
}

func roundUp<T: BinaryInteger>(_ value: T, _ multiple: T) -> T {
    (value + multiple - 1) / multiple * multiple
}
