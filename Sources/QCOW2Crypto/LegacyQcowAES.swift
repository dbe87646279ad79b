/// QEMU's legacy qcow/qcow2 AES encryption (`crypt_method = 1`, `encrypt.format=aes`).
///
/// Matches QEMU's `qcrypto_block_qcow_init`: the key is the passphrase's first 16 bytes,
/// zero-padded (so AES-**128**, whatever the old spec text says); the cipher is CBC per
/// 512-byte sector with a `plain64` IV of the **guest** sector number (guest offset /
/// 512). There is no key check: a wrong passphrase just decrypts to garbage. QEMU no
/// longer lets system emulators use such images; this module supports them for reading
/// and conversion.
public enum LegacyQcowAES {
    /// `aes-128-cbc-plain64`.
    public static let spec = CipherSpec.legacyQcowAES

    /// The 16-byte key: `passphrase` truncated or zero-padded. QEMU takes the secret up to
    /// its first NUL (`strlen`); callers pass those bytes.
    public static func key(passphrase: [UInt8]) -> SecretBytes {
        SecretBytes(count: 16) { out in
            for (i, byte) in passphrase.prefix(16).enumerated() { out[i] = byte }
        }
    }

    /// A sector cipher for the image. Pass guest offset / 512 as the sector number.
    public static func makeCipher(passphrase: [UInt8]) throws(CryptoError) -> SectorCipher {
        try SectorCipher(spec: spec, key: key(passphrase: passphrase))
    }
}
