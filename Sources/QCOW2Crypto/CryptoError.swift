/// Everything that can go wrong in the crypto layer.
///
/// Messages name the field, the slot or the algorithm involved. They never contain key
/// bytes, passphrases, salts or decrypted material: every case carries only header field
/// values (names, counts, offsets) that are already public on disk.
public enum CryptoError: Error, Equatable, Sendable, CustomStringConvertible {
    /// No active key slot opens with the given passphrase (or its master key failed the
    /// digest check). Matches QEMU's "Invalid password, cannot unlock any keyslot".
    case invalidPassphrase
    /// A cipher algorithm this module does not implement (`serpent`, `twofish`, `cast5`,
    /// a key size other than 128/192/256 bits, …).
    case unsupportedCipher(String)
    /// A block-cipher mode other than `ecb`, `cbc`, `xts`.
    case unsupportedCipherMode(String)
    /// An IV generator other than `plain`, `plain64`, `essiv:<hash>`, or an ESSIV hash whose
    /// digest size is not a valid AES key size.
    case unsupportedIVGenerator(String)
    /// A hash name that is unknown or not provided by the system libcrypto.
    case unsupportedHash(String)
    /// A key of the wrong length for the cipher: `what` names the key, `expected` lists the
    /// lengths that would have been accepted.
    case invalidKeyLength(what: String, length: Int, expected: [Int])
    /// The buffer handed to a sector cipher is not a whole number of 512-byte sectors.
    case notSectorAligned(length: Int)
    /// A structural problem in a LUKS header (magic, version, field values, geometry).
    case malformedHeader(String)
    /// A key slot that is internally inconsistent (state, iterations, stripes, offsets).
    case invalidKeySlot(slot: Int, reason: String)
    /// The key-material reader returned a different number of bytes than asked for.
    case keyMaterialShortRead(slot: Int, expected: Int, got: Int)
    /// A parameter outside the accepted range (iteration counts, lengths, stripes…).
    case invalidParameter(String)
    /// `addKeySlot` without an explicit slot, and all 8 slots are active.
    case noFreeKeySlot
    /// `addKeySlot` on a slot that is already active (QEMU: "Refusing to overwrite active keyslot").
    case keySlotActive(Int)
    /// `eraseKeySlot` on a slot that is not active.
    case keySlotInactive(Int)
    /// Erasing this slot would leave no active slot, making the data unrecoverable.
    case lastActiveKeySlot(Int)
    /// A master key handed to `addKeySlot` does not match the header's master-key digest.
    case masterKeyMismatch
    /// XTS encryption with identical key halves: OpenSSL 3 refuses it ("xts duplicated keys").
    /// Decryption with such a key still works.
    case xtsDuplicateKeys
    /// A libcrypto call failed; `detail` is OpenSSL's reason string (never key data).
    case openSSL(operation: String, detail: String)

    /// A one-line, human-readable message (safe to log: no secrets).
    public var description: String {
        switch self {
        case .invalidPassphrase:
            return "invalid passphrase: it does not unlock any active LUKS key slot"
        case .unsupportedCipher(let name):
            return "unsupported cipher '\(Self.printable(name))' (supported: aes-128, aes-192, aes-256)"
        case .unsupportedCipherMode(let name):
            return "unsupported cipher mode '\(Self.printable(name))' (supported: xts, cbc, ecb)"
        case .unsupportedIVGenerator(let name):
            return "unsupported IV generator '\(Self.printable(name))' "
                + "(supported: plain, plain64, essiv:<hash> with a 16-, 24- or 32-byte digest)"
        case .unsupportedHash(let name):
            return "unsupported hash '\(Self.printable(name))' "
                + "(supported: sha1, sha224, sha256, sha384, sha512, md5, ripemd160)"
        case .invalidKeyLength(let what, let length, let expected):
            let list = expected.map(String.init).joined(separator: ", ")
            return "invalid \(what) length \(length) bytes (expected \(list))"
        case .notSectorAligned(let length):
            return "buffer length \(length) is not a multiple of the 512-byte encryption sector"
        case .malformedHeader(let reason):
            return "malformed LUKS header: \(reason)"
        case .invalidKeySlot(let slot, let reason):
            return "LUKS key slot \(slot) is corrupted: \(reason)"
        case .keyMaterialShortRead(let slot, let expected, let got):
            return "LUKS key slot \(slot): read \(got) bytes of key material, expected \(expected)"
        case .invalidParameter(let reason):
            return "invalid parameter: \(reason)"
        case .noFreeKeySlot:
            return "all LUKS key slots are active; erase one first"
        case .keySlotActive(let slot):
            return "refusing to overwrite active LUKS key slot \(slot)"
        case .keySlotInactive(let slot):
            return "LUKS key slot \(slot) is already erased (inactive)"
        case .lastActiveKeySlot(let slot):
            return "refusing to erase LUKS key slot \(slot): it is the only active slot "
                + "and erasing it would make the data unrecoverable"
        case .masterKeyMismatch:
            return "the master key does not match the LUKS header's master-key digest"
        case .xtsDuplicateKeys:
            return "XTS key halves are identical; OpenSSL refuses to encrypt with such a key"
        case .openSSL(let operation, let detail):
            return "libcrypto \(operation) failed" + (detail.isEmpty ? "" : ": \(detail)")
        }
    }

    /// Header strings may hold arbitrary bytes: keep messages printable and short.
    static func printable(_ s: String) -> String {
        let cleaned = s.unicodeScalars.prefix(64).map { scalar -> String in
            scalar.isASCII && scalar.value >= 0x20 && scalar.value < 0x7F
                ? String(scalar) : "\\u{\(String(scalar.value, radix: 16))}"
        }
        return cleaned.joined() + (s.unicodeScalars.count > 64 ? "…" : "")
    }
}
