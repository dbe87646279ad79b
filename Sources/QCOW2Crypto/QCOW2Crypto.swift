import COpenSSL

/// Disk-encryption primitives for qcow2, over the system libcrypto (OpenSSL 3 EVP).
///
/// - ``SectorCipher`` / ``SectorCipherPool``: AES-128/192/256 in XTS, CBC or ECB with
///   `plain`, `plain64` or `essiv:<hash>` IVs, per 512-byte sector, in place.
/// - ``PBKDF2``, ``HashAlgorithm``: key derivation and digests.
/// - ``AFSplitter``: the LUKS anti-forensic splitter.
/// - ``LUKS1Header``: parse, validate, serialize, unlock, create, add and erase key slots
///   (QEMU's `crypto/block-luks.c`), without any I/O.
/// - ``LegacyQcowAES``: QEMU's `crypt_method = 1`.
///
/// Errors are ``CryptoError``; no message ever contains key bytes or passphrases, and keys
/// are kept in ``SecretBytes`` buffers that are wiped when released.
public enum QCOW2Crypto {
    /// The libcrypto version string (`OpenSSL 3.0.x …`).
    public static var libcryptoVersion: String {
        guard let p = OpenSSL_version(Int32(OPENSSL_VERSION)) else { return "unknown" }
        return String(cString: p)
    }
}
