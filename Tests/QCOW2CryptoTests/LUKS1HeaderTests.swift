import Foundation
import QCOW2Crypto
import Testing

/// LUKS1 header create / parse / serialize / unlock / amend, and hostile headers, without
/// QEMU (see QEMUInteropTests for the real-world checks).
@Suite struct LUKS1HeaderTests {
    static let passphrase = Array("correct horse".utf8)

    /// A small in-memory LUKS area.
    final class Area: @unchecked Sendable {
        var bytes: [UInt8]
        var reads: [(UInt64, Int)] = []
        init(_ bytes: [UInt8]) { self.bytes = bytes }
        func read(_ offset: UInt64, _ length: Int) throws -> [UInt8] {
            reads.append((offset, length))
            let start = Int(offset)
            return Array(bytes[start..<min(start + length, bytes.count)])
        }
        func apply(_ write: LUKS1KeyMaterialWrite) {
            bytes.replaceSubrange(Int(write.offset)..<(Int(write.offset) + write.bytes.count), with: write.bytes)
        }
        func apply(_ header: LUKS1Header) {
            bytes.replaceSubrange(0..<LUKS1Header.byteCount, with: header.serialized())
        }
    }

    static func fastOptions(_ cipher: CipherSpec = .qemuDefault, _ hash: HashAlgorithm = .sha256) -> LUKS1CreateOptions {
        LUKS1CreateOptions(cipher: cipher, hash: hash, cost: .iterations(1000))
    }

    @Test func createMatchesQEMULayout() throws {
        let created = try LUKS1Header.create(passphrase: Self.passphrase, options: Self.fastOptions())
        let h = created.header
        #expect(h.cipherName == "aes" && h.cipherMode == "xts-plain64" && h.hashSpec == "sha256")
        #expect(h.keyBytes == 64 && h.payloadOffset == 4040 && created.areaLength == 0x1F9000)
        #expect(h.keySlots.map(\.keyMaterialOffset) == [8, 512, 1016, 1520, 2024, 2528, 3032, 3536])
        #expect(h.keySlots.allSatisfy { $0.stripes == 4000 })
        #expect(h.activeKeySlots == [0])
        #expect(h.keySlots[1...].allSatisfy { $0.iterations == 0 && $0.salt.allSatisfy { $0 == 0 } })
        #expect(h.masterKeyDigestIterations == 1000 && h.keySlots[0].iterations == 1000)
        #expect(created.keyMaterial.offset == 4096 && created.keyMaterial.bytes.count == 256_000)
        #expect(created.masterKey.count == 64)
        let uuid = h.uuid
        #expect(uuid.count == 36 && uuid.split(separator: "-").map(\.count) == [8, 4, 4, 4, 12])
        #expect(uuid == uuid.lowercased())

        // Serialize → parse is the identity, and the area unlocks.
        let area = Area(created.areaBytes())
        let parsed = try LUKS1Header(parsing: area.bytes, areaLength: created.areaLength)
        #expect(parsed == h)
        #expect(parsed.serialized() == h.serialized())
        let unlocked = try parsed.unlock(passphrase: Self.passphrase, readKeyMaterial: area.read)
        #expect(unlocked.keySlot == 0)
        #expect(unlocked.masterKey.isEqual(to: created.masterKey))
        #expect(area.reads.count == 1 && area.reads[0].0 == 4096 && area.reads[0].1 == 256_000)

        // The returned cipher is the payload cipher.
        var data = [UInt8](repeating: 0x5A, count: 4096)
        try created.makeCipher().encrypt(&data, firstSector: 0x1280)
        try unlocked.cipher.decrypt(&data, firstSector: 0x1280)
        #expect(data.allSatisfy { $0 == 0x5A })
    }

    @Test(arguments: [
        ("aes-128-cbc-essiv:sha256", 16, HashAlgorithm.sha1, UInt32(1032)),
        ("aes-256-cbc-plain64", 32, .sha256, 2056),
        ("aes-192-xts-plain64", 48, .sha512, 3016),
        ("aes-128-xts-plain", 32, .ripemd160, 2056),
        ("aes-128-ecb-plain64", 16, .md5, 1032),
    ])
    func createAndUnlockEveryKind(_ spec: String, _ keyLength: Int, _ hash: HashAlgorithm, _ payload: UInt32) throws {
        let cipher = try PrimitiveTests.parseSpec(spec, keyLength: keyLength)
        let created = try LUKS1Header.create(passphrase: Self.passphrase, options: Self.fastOptions(cipher, hash))
        #expect(created.header.payloadOffset == payload)
        #expect(created.header.cipher == cipher && created.header.hash == hash)
        let area = Area(created.areaBytes())
        let parsed = try LUKS1Header(parsing: area.bytes, areaLength: created.areaLength)
        let unlocked = try parsed.unlock(passphrase: Self.passphrase, readKeyMaterial: area.read)
        #expect(unlocked.masterKey.isEqual(to: created.masterKey))
        #expect(throws: CryptoError.invalidPassphrase) {
            try parsed.unlock(passphrase: Array("wrong".utf8), readKeyMaterial: area.read)
        }
    }

    /// 24-byte keys outside XTS give 96000 bytes of key material, not whole sectors: QEMU
    /// 7.2 aborts on such images (assertion in do_qcrypto_block_cipher_encdec), so create
    /// refuses them. Reading one (cryptsetup pads to whole sectors) still works.
    @Test func createRefusesUnalignedKeyMaterial() throws {
        let spec = try CipherSpec(algorithm: .aes192, mode: .cbc, ivGenerator: .plain64)
        #expect(throws: CryptoError.self) {
            try LUKS1Header.create(passphrase: Self.passphrase, options: Self.fastOptions(spec))
        }
    }

    @Test func givenMasterKeyIsUsed() throws {
        let mk = SecretBytes((0..<64).map { UInt8($0) })
        let created = try LUKS1Header.create(passphrase: [], options: Self.fastOptions(), masterKey: mk)
        #expect(try created.header.verifyMasterKey(mk))
        #expect(try !created.header.verifyMasterKey(SecretBytes((0..<64).map { UInt8($0 ^ 1) })))
        // The empty passphrase is a passphrase like any other.
        let area = Area(created.areaBytes())
        #expect(try created.header.unlock(passphrase: [], readKeyMaterial: area.read).masterKey.isEqual(to: mk))
        #expect(throws: CryptoError.self) {
            try LUKS1Header.create(passphrase: [], options: Self.fastOptions(), masterKey: SecretBytes([1, 2, 3]))
        }
    }

    @Test func wrongPassphraseNeverLeaksSecrets() throws {
        let created = try LUKS1Header.create(passphrase: Self.passphrase, options: Self.fastOptions())
        let area = Area(created.areaBytes())
        do {
            _ = try created.header.unlock(passphrase: Array("hunter2".utf8), readKeyMaterial: area.read)
            Issue.record("unlocked with a wrong passphrase")
        } catch {
            let message = "\(error)"
            #expect(message.contains("invalid passphrase"))
            #expect(!message.contains("hunter2"))
            #expect(!message.contains(hexString(created.masterKey.bytes.prefix(4))))
        }
    }

    @Test func corruptedKeyMaterialDoesNotUnlock() throws {
        let created = try LUKS1Header.create(passphrase: Self.passphrase, options: Self.fastOptions())
        let area = Area(created.areaBytes())
        area.bytes[4096 + 100_000] ^= 0x80
        #expect(throws: CryptoError.invalidPassphrase) {
            try created.header.unlock(passphrase: Self.passphrase, readKeyMaterial: area.read)
        }
        // A reader that returns too little is reported, not trusted.
        #expect(throws: CryptoError.keyMaterialShortRead(slot: 0, expected: 256_000, got: 10)) {
            try created.header.unlock(passphrase: Self.passphrase) { _, _ in [UInt8](repeating: 0, count: 10) }
        }
        // Reader errors pass through unchanged.
        struct IOFailure: Error, Equatable {}
        #expect(throws: IOFailure()) {
            try created.header.unlock(passphrase: Self.passphrase) { _, _ in throw IOFailure() }
        }
    }

    @Test func addAndEraseKeySlots() throws {
        let created = try LUKS1Header.create(passphrase: Self.passphrase, options: Self.fastOptions())
        let area = Area(created.areaBytes())
        var header = created.header
        let second = Array("second".utf8)

        let w1 = try header.addKeySlot(passphrase: second, masterKey: created.masterKey, cost: .iterations(1000))
        #expect(w1.slot == 1 && w1.offset == 512 * 512 && w1.bytes.count == 256_000)
        area.apply(w1)
        area.apply(header)
        var parsed = try LUKS1Header(parsing: area.bytes, areaLength: created.areaLength)
        #expect(parsed.activeKeySlots == [0, 1])
        #expect(try parsed.unlock(passphrase: second, readKeyMaterial: area.read).keySlot == 1)
        #expect(try parsed.unlock(passphrase: Self.passphrase, readKeyMaterial: area.read).keySlot == 0)
        #expect(try parsed.keySlots(openedBy: second, readKeyMaterial: area.read) == [1])

        // Explicit slot; refusing active slots; wrong master key.
        let w7 = try parsed.addKeySlot(
            passphrase: second, masterKey: created.masterKey, slot: 7, cost: .iterations(1000))
        #expect(w7.slot == 7)
        area.apply(w7)
        area.apply(parsed)
        #expect(throws: CryptoError.keySlotActive(7)) {
            try parsed.addKeySlot(passphrase: second, masterKey: created.masterKey, slot: 7, cost: .iterations(1000))
        }
        #expect(throws: CryptoError.masterKeyMismatch) {
            try parsed.addKeySlot(passphrase: second, masterKey: SecretBytes([UInt8](repeating: 1, count: 64)))
        }
        #expect(try parsed.keySlots(openedBy: second, readKeyMaterial: area.read) == [1, 7])

        // Erase slot 0: the garbage replaces its material and the header says disabled.
        let e0 = try parsed.eraseKeySlot(0)
        #expect(e0.slot == 0 && e0.offset == 4096 && e0.bytes.count == 256_000)
        area.apply(parsed)
        area.apply(e0)
        let reparsed = try LUKS1Header(parsing: area.bytes, areaLength: created.areaLength)
        #expect(reparsed.activeKeySlots == [1, 7])
        #expect(reparsed.keySlots[0].iterations == 0 && reparsed.keySlots[0].salt.allSatisfy { $0 == 0 })
        #expect(throws: CryptoError.invalidPassphrase) {
            try reparsed.unlock(passphrase: Self.passphrase, readKeyMaterial: area.read)
        }
        #expect(try reparsed.unlock(passphrase: second, readKeyMaterial: area.read).masterKey.isEqual(to: created.masterKey))
        #expect(throws: CryptoError.keySlotInactive(0)) { try parsed.eraseKeySlot(0) }
        #expect(throws: CryptoError.self) { try parsed.eraseKeySlot(8) }

        // The last active slot is protected unless forced.
        _ = try parsed.eraseKeySlot(1)
        #expect(throws: CryptoError.lastActiveKeySlot(7)) { try parsed.eraseKeySlot(7) }
        _ = try parsed.eraseKeySlot(7, allowErasingLastSlot: true)
        #expect(parsed.activeKeySlots.isEmpty)

        // All slots full.
        var full = created.header
        for _ in 1..<8 {
            _ = try full.addKeySlot(passphrase: second, masterKey: created.masterKey, cost: .iterations(1000))
        }
        #expect(throws: CryptoError.noFreeKeySlot) {
            try full.addKeySlot(passphrase: second, masterKey: created.masterKey, cost: .iterations(1000))
        }
    }

    /// QEMU's iteration calibration: with iter-time, counts are ≥ 1000 and the digest gets
    /// about 1/8 of the slot's (same hash, different output sizes, so only roughly).
    @Test func iterTimeCalibration() throws {
        let rate = try PBKDF2.iterationsPerSecond(hash: .sha256, passwordLength: 8, saltLength: 32, keyLength: 32)
        #expect(rate > 10_000)
        let created = try LUKS1Header.create(
            passphrase: Self.passphrase,
            options: LUKS1CreateOptions(cost: .iterTime(milliseconds: 50)))
        let slot = created.header.keySlots[0].iterations
        let digest = created.header.masterKeyDigestIterations
        #expect(slot >= 1000 && digest >= 1000)
        #expect(slot >= digest)
        let area = Area(created.areaBytes())
        #expect(try created.header.unlock(passphrase: Self.passphrase, readKeyMaterial: area.read).keySlot == 0)
        #expect(throws: CryptoError.self) {
            try LUKS1Header.create(passphrase: [], options: LUKS1CreateOptions(cost: .iterTime(milliseconds: 0)))
        }
        #expect(throws: CryptoError.self) {
            try LUKS1Header.create(passphrase: [], options: LUKS1CreateOptions(cost: .iterations(0)))
        }
    }

    // MARK: Hostile headers

    static let validHeader: [UInt8] = {
        // A QEMU-layout header with fixed contents (no unlock needed for these tests).
        let created = try? LUKS1Header.create(passphrase: [1], options: fastOptions())
        return created?.header.serialized() ?? []
    }()
    static let areaLength: UInt64 = 0x1F9000

    static func mutated(_ change: (inout [UInt8]) -> Void) -> [UInt8] {
        var b = validHeader
        change(&b)
        return b
    }

    static func slotOffset(_ i: Int) -> Int { 208 + 48 * i }

    struct Hostile: Sendable, CustomTestStringConvertible {
        var name: String
        var bytes: [UInt8]
        var areaLength: UInt64 = LUKS1HeaderTests.areaLength
        var expect: String
        var testDescription: String { name }
    }

    static let hostile: [Hostile] = [
        Hostile(name: "short", bytes: Array(validHeader[0..<100]), expect: "header is 100 bytes"),
        Hostile(name: "wrong magic", bytes: mutated { $0[0] = 0x6C }, expect: "bad magic"),
        Hostile(name: "version 2", bytes: mutated { $0[7] = 2 }, expect: "LUKS version 2"),
        Hostile(
            name: "unterminated cipher name",
            bytes: mutated { for i in 8..<40 { $0[i] = 0x61 } }, expect: "cipher_name is not NUL-terminated"),
        Hostile(name: "cipher serpent", bytes: mutated { $0.replaceSubrange(8..<15, with: Array("serpent".utf8)) },
                expect: "unsupported cipher 'serpent'"),
        Hostile(name: "unknown hash", bytes: mutated { $0.replaceSubrange(72..<78, with: Array("sha999".utf8)) },
                expect: "unsupported hash 'sha999'"),
        Hostile(name: "key bytes 7", bytes: mutated { putBE32(&$0, 108, 7) }, expect: "invalid LUKS key_bytes"),
        Hostile(name: "key bytes 16 for xts", bytes: mutated { putBE32(&$0, 108, 16) }, expect: "invalid LUKS key_bytes"),
        Hostile(name: "key bytes huge", bytes: mutated { putBE32(&$0, 108, 0xFFFF_FFF0) }, expect: "invalid LUKS key_bytes"),
        Hostile(name: "digest iterations 0", bytes: mutated { putBE32(&$0, 164, 0) },
                expect: "master-key digest iteration count 0"),
        Hostile(name: "bad slot state", bytes: mutated { putBE32(&$0, slotOffset(3), 0x1234) },
                expect: "key slot 3 is corrupted: state marker"),
        Hostile(name: "active slot iterations 0", bytes: mutated { putBE32(&$0, slotOffset(0) + 4, 0) },
                expect: "key slot 0 is corrupted: iteration count is zero"),
        Hostile(name: "active slot iterations huge", bytes: mutated { putBE32(&$0, slotOffset(0) + 4, 0xFFFF_FFFF) },
                expect: "iteration count 4294967295 is too large"),
        Hostile(name: "stripes 0", bytes: mutated { putBE32(&$0, slotOffset(0) + 44, 0) },
                expect: "key slot 0 is corrupted: stripe count 0"),
        Hostile(name: "stripes huge", bytes: mutated { putBE32(&$0, slotOffset(2) + 44, 0xFFFF_FFFF) },
                expect: "stripe count 4294967295 is out of range"),
        Hostile(name: "key material over the header", bytes: mutated { putBE32(&$0, slotOffset(0) + 40, 1) },
                expect: "overlaps the LUKS header"),
        Hostile(name: "key material past payload", bytes: mutated { putBE32(&$0, slotOffset(7) + 40, 3900) },
                expect: "overlaps the payload"),
        Hostile(name: "key material offset huge",
                bytes: mutated { putBE32(&$0, slotOffset(7) + 40, 0x10000); putBE32(&$0, 104, 0xFFFF_FFFF) },
                expect: "key slot 7 is corrupted: key material (bytes 33554432..<33810432) lies outside the 2068480-byte LUKS area"),
        Hostile(name: "area shorter than key material", bytes: validHeader, areaLength: 0x100000,
                expect: "outside the 1048576-byte LUKS area"),
        Hostile(name: "area shorter than header", bytes: validHeader, areaLength: 100,
                expect: "cannot hold the 592-byte header"),
        Hostile(name: "overlapping slots", bytes: mutated { putBE32(&$0, slotOffset(1) + 40, 100) },
                expect: "key slots 0 and 1 overlap"),
    ]

    @Test(arguments: hostile)
    func hostileHeaderIsRejected(_ h: Hostile) {
        do {
            _ = try LUKS1Header(parsing: h.bytes, areaLength: h.areaLength)
            Issue.record("accepted: \(h.name)")
        } catch {
            #expect("\(error)".contains(h.expect), "\(error)")
        }
    }

    /// Random byte flips never crash the parser (and whatever parses, serializes back).
    @Test func fuzzHeaderFlips() throws {
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<3000 {
            var b = Self.validHeader
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                b[Int.random(in: 0..<b.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            }
            if let h = try? LUKS1Header(parsing: b, areaLength: Self.areaLength) {
                #expect(try LUKS1Header(parsing: h.serialized(), areaLength: Self.areaLength) == h)
            }
        }
    }
}
