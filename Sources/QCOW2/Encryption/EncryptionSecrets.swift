import QCOW2Crypto

/// Passphrases for the encrypted layers of a chain (LUKS, crypt_method 2, or legacy AES,
/// crypt_method 1).
///
/// QEMU gives each encrypted layer its own secret (`encrypt.key-secret` for the top image,
/// `backing.encrypt.key-secret` for the next one, …); `byDepth` mirrors that, keyed by the
/// layer's index in the chain (0 = top). `fallback` is used for any encrypted layer without
/// its own entry (the CLI's `--password-file`).
///
/// The passphrase is the secret's bytes up to its first NUL, as QEMU uses it.
public struct EncryptionSecrets: Sendable {
    /// Passphrase per chain depth (0 = the top image).
    public var byDepth: [Int: SecretBytes] = [:]
    /// Passphrase for encrypted layers that have no entry in `byDepth`.
    public var fallback: SecretBytes?

    public init(byDepth: [Int: SecretBytes] = [:], fallback: SecretBytes? = nil) {
        self.byDepth = byDepth
        self.fallback = fallback
    }

    /// The passphrase to try for the layer at `depth`, if any.
    public func passphrase(forDepth depth: Int) -> SecretBytes? { byDepth[depth] ?? fallback }

    /// The secrets of the chain that starts `depth` layers further down (its layer 0 is
    /// this chain's layer `depth`); the fallback is kept.
    public func below(_ depth: Int) -> EncryptionSecrets {
        var out = EncryptionSecrets(fallback: fallback)
        for (d, s) in byDepth where d >= depth { out.byDepth[d - depth] = s }
        return out
    }

    /// True when no passphrase at all is configured.
    public var isEmpty: Bool { byDepth.isEmpty && fallback == nil }
}

extension SecretBytes {
    /// The bytes QEMU uses as a passphrase: up to the first NUL (QEMU's secrets are C
    /// strings). The caller wipes the returned array.
    func passphraseBytes() -> [UInt8] {
        withUnsafeBytes { raw in Array(raw.prefix { $0 != 0 }) }
    }
}
