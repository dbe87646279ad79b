import COpenSSL

/// A sector cipher: algorithm, block mode and IV generator, e.g. `aes-256-xts-plain64`.
///
/// LUKS1 spells it in two header fields: `cipher_name` (`aes`) and `cipher_mode`
/// (`xts-plain64`, `cbc-essiv:sha256`), with the key size given by `key_bytes`. QEMU's
/// `qemu-img` spells it `encrypt.cipher-alg=aes-256`, `encrypt.cipher-mode=xts`,
/// `encrypt.ivgen-alg=plain64`, `encrypt.ivgen-hash-alg=sha256`.
public struct CipherSpec: Sendable, Hashable, CustomStringConvertible {
    /// The block cipher and its key size.
    public enum Algorithm: String, Sendable, Hashable, CaseIterable {
        case aes128 = "aes-128"
        case aes192 = "aes-192"
        case aes256 = "aes-256"

        /// The cipher key size in bytes (one XTS half).
        public var keySize: Int {
            switch self {
            case .aes128: 16
            case .aes192: 24
            case .aes256: 32
            }
        }

        /// AES with a key of `keySize` bytes, if that is a valid AES key size.
        public init?(aesKeySize keySize: Int) {
            switch keySize {
            case 16: self = .aes128
            case 24: self = .aes192
            case 32: self = .aes256
            default: return nil
            }
        }

        /// QEMU's `cipher-alg` spelling (`aes-256`).
        public var name: String { rawValue }
    }

    /// The block-cipher mode.
    public enum Mode: String, Sendable, Hashable, CaseIterable {
        /// No IV; each 16-byte block independently (accepted by QEMU, not recommended).
        case ecb
        /// CBC restarted at every 512-byte sector with the generated IV.
        case cbc
        /// XTS with the generated IV as the tweak; the key is two cipher keys (data ‖ tweak).
        case xts
    }

    /// How the per-sector IV is derived from the sector number.
    public enum IVGenerator: Sendable, Hashable, CustomStringConvertible {
        /// Low 32 bits of the sector number, little-endian, zero-padded.
        case plain
        /// The 64-bit sector number, little-endian, zero-padded.
        case plain64
        /// `E_{K'}(LE64(sector) ‖ 0…)` with `K' = hash(key)` and AES sized by the digest.
        case essiv(HashAlgorithm)

        /// The LUKS spelling (`plain64`, `essiv:sha256`).
        public var description: String {
            switch self {
            case .plain: "plain"
            case .plain64: "plain64"
            case .essiv(let hash): "essiv:\(hash.name)"
            }
        }

        /// QEMU's `ivgen-alg` spelling without the hash.
        public var name: String {
            switch self {
            case .plain: "plain"
            case .plain64: "plain64"
            case .essiv: "essiv"
            }
        }
    }

    /// The block cipher.
    public let algorithm: Algorithm
    /// The block mode.
    public let mode: Mode
    /// The IV generator (ignored by ECB, which has no IV).
    public let ivGenerator: IVGenerator

    /// QEMU's default for new LUKS images: `aes-256-xts-plain64`.
    public static let qemuDefault = CipherSpec(checked: .aes256, .xts, .plain64)

    /// QEMU's legacy qcow AES (crypt_method 1): `aes-128-cbc-plain64`.
    public static let legacyQcowAES = CipherSpec(checked: .aes128, .cbc, .plain64)

    /// A spec; throws if the ESSIV hash's digest size is not an AES key size (16/24/32:
    /// `md5`, `sha256`), which is what QEMU requires too.
    public init(algorithm: Algorithm, mode: Mode, ivGenerator: IVGenerator) throws(CryptoError) {
        if case .essiv(let hash) = ivGenerator {
            guard Algorithm(aesKeySize: hash.digestSize) != nil else {
                throw .unsupportedIVGenerator(ivGenerator.description)
            }
        }
        self.init(checked: algorithm, mode, ivGenerator)
    }

    private init(checked algorithm: Algorithm, _ mode: Mode, _ ivGenerator: IVGenerator) {
        self.algorithm = algorithm
        self.mode = mode
        self.ivGenerator = ivGenerator
    }

    /// Length of the key this spec takes: the AES key size, doubled for XTS. This is the
    /// LUKS `key_bytes` (64 for `aes-256-xts`).
    public var keyLength: Int { mode == .xts ? 2 * algorithm.keySize : algorithm.keySize }

    /// The LUKS `cipher_name` field: `aes`.
    public var luksCipherName: String { "aes" }

    /// The LUKS `cipher_mode` field: `<mode>-<ivgen>[:<hash>]`.
    public var luksCipherMode: String { "\(mode.rawValue)-\(ivGenerator)" }

    /// `aes-256-xts-plain64`.
    public var description: String { "\(algorithm.rawValue)-\(luksCipherMode)" }

    /// Parses the LUKS `cipher_name`, `cipher_mode` and `key_bytes` fields the way QEMU's
    /// `qcrypto_block_luks_open` does: names are exact and lower-case, the mode must carry
    /// an IV generator, `essiv` needs a hash, and `key_bytes` selects the AES key size
    /// (halved first for XTS), so it must be 16/24/32, or 32/48/64 for XTS.
    public init(luksCipherName: String, luksCipherMode: String, keyBytes: Int) throws(CryptoError) {
        guard luksCipherName == "aes" else { throw .unsupportedCipher(luksCipherName) }
        guard let dash = luksCipherMode.firstIndex(of: "-") else {
            throw .unsupportedCipherMode(luksCipherMode)
        }
        let modeName = String(luksCipherMode[..<dash])
        let ivSpec = String(luksCipherMode[luksCipherMode.index(after: dash)...])
        guard let mode = Mode(rawValue: modeName) else { throw .unsupportedCipherMode(modeName) }

        let ivName: String
        let ivHashName: String?
        if let colon = ivSpec.firstIndex(of: ":") {
            ivName = String(ivSpec[..<colon])
            ivHashName = String(ivSpec[ivSpec.index(after: colon)...])
        } else {
            ivName = ivSpec
            ivHashName = nil
        }
        // QEMU parses (and for plain/plain64 ignores) an IV hash; it must still be valid.
        let ivHash: HashAlgorithm?
        if let ivHashName {
            guard let hash = HashAlgorithm(name: ivHashName) else { throw .unsupportedHash(ivHashName) }
            ivHash = hash
        } else {
            ivHash = nil
        }
        let ivGenerator: IVGenerator
        switch ivName {
        case "plain": ivGenerator = .plain
        case "plain64": ivGenerator = .plain64
        case "essiv":
            guard let ivHash else { throw .unsupportedIVGenerator("essiv without a hash") }
            ivGenerator = .essiv(ivHash)
        default: throw .unsupportedIVGenerator(ivSpec)
        }

        let cipherKeyBytes = mode == .xts ? keyBytes / 2 : keyBytes
        guard keyBytes > 0, mode != .xts || keyBytes % 2 == 0,
            let algorithm = Algorithm(aesKeySize: cipherKeyBytes)
        else {
            throw .invalidKeyLength(
                what: "LUKS key_bytes for \(modeName)", length: keyBytes,
                expected: mode == .xts ? [32, 48, 64] : [16, 24, 32])
        }
        try self.init(algorithm: algorithm, mode: mode, ivGenerator: ivGenerator)
    }

    /// The libcrypto cipher for the data (`EVP_aes_256_xts()`, …).
    var evpCipher: OpaquePointer? {
        switch (algorithm, mode) {
        case (.aes128, .ecb): EVP_aes_128_ecb()
        case (.aes192, .ecb): EVP_aes_192_ecb()
        case (.aes256, .ecb): EVP_aes_256_ecb()
        case (.aes128, .cbc): EVP_aes_128_cbc()
        case (.aes192, .cbc): EVP_aes_192_cbc()
        case (.aes256, .cbc): EVP_aes_256_cbc()
        case (.aes128, .xts): EVP_aes_128_xts()
        case (.aes192, .xts): nil  // OpenSSL has no AES-192-XTS; SectorCipher builds it from ECB
        case (.aes256, .xts): EVP_aes_256_xts()
        }
    }
}
