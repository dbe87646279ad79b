import QCOW2Crypto
import QCOW2Format

/// The encryption of one qcow2 layer: its method, its LUKS header (for `info`), and, when
/// the layer was unlocked, the sector cipher for its data clusters.
///
/// Only guest data clusters are encrypted, in 512-byte sectors. The IV sector number is
/// the **host** offset / 512 for LUKS (QEMU's `crypt_physical_offset`) and the **guest**
/// offset / 512 for legacy AES. Zero and unallocated clusters are never decrypted, and
/// compressed clusters are stored in clear (QEMU never encrypts them).
final class LayerEncryption: Sendable {
    enum Method: Sendable { case luks, legacyAES }

    let method: Method
    let path: String
    /// The parsed LUKS header (LUKS only).
    let luksHeader: LUKS1Header?
    /// The FDE header extension: where the LUKS area is (LUKS only).
    let area: (offset: UInt64, length: UInt64)?
    /// The payload cipher; nil when the layer was opened without its secret (metadata only).
    let ciphers: SectorCipherPool?

    static let sectorSize: UInt64 = 512
    /// Largest LUKS area accepted: the header plus 8 slots of 64-byte keys × 4000 stripes is
    /// about 2 MiB; anything far beyond that is not a QEMU image (and would be untrusted).
    static let maximumAreaLength: UInt64 = 64 << 20

    /// Reads the encryption of a layer whose header says it is encrypted.
    ///
    /// - Throws: a clear error when the secret is missing (unless `allowMissingSecret`),
    ///   wrong, the FDE extension is missing or points outside the file, the LUKS header is
    ///   malformed, or a legacy AES image is opened for writing. Messages never contain the
    ///   secret.
    init(image: ImageHeader, path: String, file: FileHandle, fileSize: UInt64, clusterSize: UInt64,
         passphrase: SecretBytes?, writable: Bool, allowMissingSecret: Bool) throws {
        self.path = path
        let h = image.header
        switch h.cryptMethod {
        case .aes?:
            guard !writable else {
                throw QCOW2Error.unsupported(path: path, "AES-CBC encrypted images (crypt_method 1) can only be opened read-only; convert to a LUKS image (-o encrypt.format=luks) to write")
            }
            method = .legacyAES
            luksHeader = nil
            area = nil
            if let passphrase {
                var bytes = passphrase.passphraseBytes()
                defer { SecretBytes.wipe(&bytes) }
                ciphers = try Self.cryptoCall(path) { () throws(CryptoError) in
                    try SectorCipherPool(spec: LegacyQcowAES.spec, key: LegacyQcowAES.key(passphrase: bytes))
                }
            } else if allowMissingSecret {
                ciphers = nil
            } else {
                throw Self.missingSecret(path)
            }
        case .luks?:
            method = .luks
            guard let fde = image.fullDiskEncryption else {
                throw QCOW2Error.format(path: path, .malformed("crypt_method is 2 (LUKS) but the full disk encryption header extension (0x0537be77) is missing"))
            }
            let (areaEnd, overflow) = fde.offset.addingReportingOverflow(fde.length)
            guard fde.length >= UInt64(LUKS1Header.byteCount), fde.length <= Self.maximumAreaLength,
                  fde.offset % clusterSize == 0, fde.offset >= clusterSize, !overflow, areaEnd <= fileSize
            else {
                throw QCOW2Error.format(path: path, .invalidField("full disk encryption header", value: fde.offset,
                    reason: "LUKS area of \(fde.length) bytes at offset \(fde.offset) is not a cluster-aligned range inside the file (\(fileSize) bytes)"))
            }
            area = (fde.offset, fde.length)
            let headerBytes = try file.read(count: LUKS1Header.byteCount, at: fde.offset)
            let header = try Self.cryptoCall(path) { () throws(CryptoError) in
                try LUKS1Header(parsing: headerBytes, areaLength: fde.length)
            }
            luksHeader = header
            guard let passphrase else {
                guard allowMissingSecret else { throw Self.missingSecret(path) }
                ciphers = nil
                return
            }
            var bytes = passphrase.passphraseBytes()
            defer { SecretBytes.wipe(&bytes) }
            let unlocked: LUKS1Unlocked
            do {
                unlocked = try header.unlock(passphrase: bytes) { offset, length in
                    // The header validated these against the area length; check again.
                    let (end, o) = offset.addingReportingOverflow(UInt64(length))
                    guard !o, end <= fde.length else {
                        throw QCOW2Error.corrupt(path: path, "LUKS key material lies outside the encryption header area")
                    }
                    return try file.read(count: length, at: fde.offset + offset)
                }
            } catch let error as CryptoError {
                throw Self.translate(error, path)
            }
            ciphers = try Self.cryptoCall(path) { () throws(CryptoError) in try unlocked.makeCipherPool() }
        case .none?, nil:
            throw QCOW2Error.format(path: path, .invalidField("crypt_method", value: UInt64(h.cryptMethodRaw), reason: "unknown encryption method"))
        }
    }

    /// QEMU's message, plus how to give the secret to this tool.
    static func missingSecret(_ path: String) -> QCOW2Error {
        .invalidArgument("\(path): image is encrypted; a secret is needed (--object secret,id=ID,data=...|file=... with --image-opts ...,encrypt.key-secret=ID, or --password-file PATH). Parameter 'encrypt.key-secret' is required for cipher")
    }

    static func translate(_ error: CryptoError, _ path: String) -> QCOW2Error {
        switch error {
        case .invalidPassphrase:
            return .invalidArgument("\(path): Invalid password, cannot unlock any keyslot")
        case .unsupportedCipher, .unsupportedCipherMode, .unsupportedIVGenerator, .unsupportedHash:
            return .unsupported(path: path, "\(error)")
        default:
            return .corrupt(path: path, "\(error)")
        }
    }

    static func cryptoCall<T>(_ path: String, _ body: () throws(CryptoError) -> T) throws -> T {
        do { return try body() } catch { throw translate(error, path) }
    }

    /// The cipher, or the missing-secret error (a layer opened for metadata only).
    private func pool() throws -> SectorCipherPool {
        guard let ciphers else { throw Self.missingSecret(path) }
        return ciphers
    }

    /// The IV sector number of the 512-byte sector at `host` / `guest`.
    private func sector(host: UInt64, guest: UInt64) -> UInt64 {
        method == .luks ? host / Self.sectorSize : guest / Self.sectorSize
    }

    /// Reads and decrypts `dest.count` bytes of a data cluster stored at `host` (guest
    /// offset `guest`). Unaligned requests read the whole sectors around them.
    func read(file: FileHandle, host: UInt64, guest: UInt64, into dest: UnsafeMutableRawBufferPointer) throws {
        let ciphers = try pool()
        let head = host % Self.sectorSize
        let alignedHost = host - head, alignedGuest = guest - head
        let total = (head + UInt64(dest.count) + Self.sectorSize - 1) / Self.sectorSize * Self.sectorSize
        if head == 0 && total == UInt64(dest.count) {
            try file.read(into: dest, at: host)
            try Self.cryptoCall(path) { () throws(CryptoError) in
                try ciphers.decrypt(dest, firstSector: sector(host: host, guest: guest))
            }
            return
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(total), alignment: 4096)
        defer { buffer.deallocate() }
        try file.read(into: buffer, at: alignedHost)
        try Self.cryptoCall(path) { () throws(CryptoError) in
            try ciphers.decrypt(buffer, firstSector: sector(host: alignedHost, guest: alignedGuest))
        }
        dest.copyMemory(from: UnsafeRawBufferPointer(rebasing: buffer[Int(head)..<(Int(head) + dest.count)]))
    }

    /// Encrypts `data`, to be stored at `host` (LUKS: sector-aligned), into a new buffer of
    /// whole sectors (a partial last sector is padded with zeros before encryption). The
    /// caller deallocates the buffer.
    func encrypted(_ data: UnsafeRawBufferPointer, host: UInt64) throws -> UnsafeMutableRawBufferPointer {
        let ciphers = try pool()
        guard method == .luks else {
            throw QCOW2Error.unsupported(path: path, "writing AES-CBC encrypted images is not supported")
        }
        guard host % Self.sectorSize == 0 else {
            throw QCOW2Error.invalidArgument("internal: encrypted write at host offset \(host) is not 512-byte aligned")
        }
        let total = (data.count + 511) / 512 * 512
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: total, alignment: 4096)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        if let base = data.baseAddress, !data.isEmpty { buffer.baseAddress?.copyMemory(from: base, byteCount: data.count) }
        do {
            try Self.cryptoCall(path) { () throws(CryptoError) in
                try ciphers.encrypt(buffer, firstSector: host / Self.sectorSize)
            }
        } catch {
            buffer.deallocate()
            throw error
        }
        return buffer
    }

    /// What `info` shows.
    var info: EncryptionInfo {
        EncryptionInfo(format: method == .luks ? "luks" : "aes", luks: luksHeader, unlocked: ciphers != nil)
    }
}

/// The encryption of an image as `qemu-img info` reports it.
public struct EncryptionInfo: Sendable {
    /// "luks" or "aes" (QEMU's `encrypt.format`).
    public var format: String
    /// The LUKS header (cipher, hash, uuid, key slots, payload offset), for LUKS images.
    public var luks: LUKS1Header?
    /// True when the image was opened with a working secret.
    public var unlocked: Bool
}
