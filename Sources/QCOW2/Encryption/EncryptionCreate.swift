import QCOW2Crypto
import QCOW2Format

/// Encryption of a new qcow2 image (`-o encrypt.format=luks,...`). Only LUKS can be
/// created: legacy AES images are supported read-only.
public struct EncryptionCreateOptions: Sendable {
    /// The passphrase stored in key slot 0.
    public var passphrase: SecretBytes
    /// Cipher, hash and PBKDF2 cost; the defaults are QEMU's (aes-256-xts-plain64, sha256,
    /// iter-time 2000 ms).
    public var luks: LUKS1CreateOptions

    public init(passphrase: SecretBytes, luks: LUKS1CreateOptions = LUKS1CreateOptions()) {
        self.passphrase = passphrase
        self.luks = luks
    }
}

extension ImageCreator {
    /// Bytes of the LUKS area qemu-img reserves for `cipher` (header and 8 key slots of
    /// 4000 stripes: `payload_offset × 512`), for `measure`.
    public static func luksAreaLength(_ cipher: CipherSpec) -> UInt64 {
        let sector = UInt64(LUKS1Header.sectorSize)
        let material = (UInt64(cipher.keyLength) * UInt64(LUKS1Header.defaultStripes) + sector - 1) / sector
        let span = (material + 7) / 8 * 8
        return (8 + UInt64(LUKS1Header.keySlotCount) * span) * sector
    }

    /// Allocates the LUKS area right after the L1 table, as `qemu-img create` does
    /// (`qcow2_crypto_hdr_init_func`: whole clusters, zero-filled), writes the LUKS header
    /// and slot 0's key material into it, and records it in the header (crypt_method 2
    /// and the full disk encryption extension).
    static func writeEncryptionArea(_ options: EncryptionCreateOptions, file: FileHandle, refcounts: RefcountManager,
                                    clusterSize: UInt64, path: String, image: inout ImageHeader) throws {
        var passphrase = options.passphrase.passphraseBytes()
        defer { SecretBytes.wipe(&passphrase) }
        let created = try LayerEncryption.cryptoCall(path) { () throws(CryptoError) in
            try LUKS1Header.create(passphrase: passphrase, options: options.luks)
        }
        let length = created.areaLength
        let clusters = (length + clusterSize - 1) / clusterSize
        let offset = try refcounts.allocate(clusters: clusters)
        var area = created.areaBytes()
        area.append(contentsOf: [UInt8](repeating: 0, count: Int(clusters * clusterSize) - area.count))
        try file.write(area, at: offset)
        image.header.cryptMethodRaw = CryptMethod.luks.rawValue
        image.extensions.append(.fullDiskEncryption(offset: offset, length: length))
    }
}
