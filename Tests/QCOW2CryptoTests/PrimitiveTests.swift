import Foundation
import QCOW2Crypto
import Testing

/// Known-answer tests for the primitives. Vectors marked "python" were computed with
/// `/usr/bin/python3` and the `cryptography` 38 package (AES-ECB/CBC/XTS) and `hashlib`
/// (PBKDF2, AF splitter written from the format doc), independently of this module.
@Suite struct PrimitiveTests {
    static let ieeePlaintext = [UInt8]((0...255).map { UInt8($0) } + (0...255).map { UInt8($0) })

    // MARK: XTS (IEEE 1619-2007)

    /// Vector 10: XTS-AES-256, data unit 0xff.
    @Test func xtsAES256Vector10() throws {
        let key = hex(
            "2718281828459045235360287471352662497757247093699959574966967627"
                + "3141592653589793238462643383279502884197169399375105820974944592")
        let expected = hex(
            """
            1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44
            680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
            c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7d
            e8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
            93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6
            dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
            505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b
            11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
            6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493
            c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
            773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151
            """)
        let spec = try CipherSpec(algorithm: .aes256, mode: .xts, ivGenerator: .plain64)
        let cipher = try SectorCipher(spec: spec, key: key)
        var data = Self.ieeePlaintext
        try cipher.encrypt(&data, firstSector: 0xff)
        #expect(data == expected)
        try cipher.decrypt(&data, firstSector: 0xff)
        #expect(data == Self.ieeePlaintext)
    }

    /// Vector 4: XTS-AES-128 with distinct key halves, data unit 0.
    @Test func xtsAES128Vector4() throws {
        let key = hex("27182818284590452353602874713526" + "31415926535897932384626433832795")
        let expected = hex(
            """
            27a7479befa1d476489f308cd4cfa6e2a96e4bbe3208ff25287dd3819616e89cc78cf7f5e543445f8333d8fa7f560000
            05279fa5d8b5e4ad40e736ddb4d35412328063fd2aab53e5ea1e0a9f332500a5df9487d07a5c92cc512c8866c7e860ce
            93fdf166a24912b422976146ae20ce846bb7dc9ba94a767aaef20c0d61ad02655ea92dc4c4e41a8952c651d33174be51
            a10c421110e6d81588ede82103a252d8a750e8768defffed9122810aaeb99f9172af82b604dc4b8e51bcb08235a6f434
            1332e4ca60482a4ba1a03b3e65008fc5da76b70bf1690db4eae29c5f1badd03c5ccf2a55d705ddcd86d449511ceb7ec3
            0bf12b1fa35b913f9f747a8afd1b130e94bff94effd01a91735ca1726acd0b197c4e5b03393697e126826fb6bbde8ecc
            1e08298516e2c9ed03ff3c1b7860f6de76d4cecd94c8119855ef5297ca67e9f3e7ff72b1e99785ca0a7e7720c5b36dc6
            d72cac9574c8cbbc2f801e23e56fd344b07f22154beba0f08ce8891e643ed995c94d9a69c9f1b5f499027a78572aeebd
            74d20cc39881c213ee770b1010e4bea718846977ae119f7a023ab58cca0ad752afe656bb3c17256a9f6e9bf19fdd5a38
            fc82bbe872c5539edb609ef4f79c203ebb140f2e583cb2ad15b4aa5b655016a8449277dbd477ef2c8d6c017db738b18d
            eb4a427d1923ce3ff262735779a418f20a282df920147beabe421ee5319d0568
            """)
        let spec = try CipherSpec(algorithm: .aes128, mode: .xts, ivGenerator: .plain64)
        let cipher = try SectorCipher(spec: spec, key: key)
        var data = Self.ieeePlaintext
        try cipher.encrypt(&data, firstSector: 0)
        #expect(data == expected)
        try cipher.decrypt(&data, firstSector: 0)
        #expect(data == Self.ieeePlaintext)
    }

    /// OpenSSL refuses XTS encryption with key1 == key2 (IEEE vector 1): a clear error, and
    /// decryption still works.
    @Test func xtsDuplicateKeyHalves() throws {
        let spec = try CipherSpec(algorithm: .aes128, mode: .xts, ivGenerator: .plain64)
        let cipher = try SectorCipher(spec: spec, key: [UInt8](repeating: 0, count: 32))
        var data = [UInt8](repeating: 0, count: 512)
        #expect(throws: CryptoError.xtsDuplicateKeys) { try cipher.encrypt(&data, firstSector: 0) }
        // IEEE vector 1's first ciphertext block decrypts to zeros.
        var ct = hex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e")
        ct += [UInt8](repeating: 0, count: 512 - ct.count)
        try cipher.decrypt(&ct, firstSector: 0)
        #expect(ct[0..<32].allSatisfy { $0 == 0 })
    }

    // MARK: Sector ciphers against python `cryptography`

    struct SectorVector: Sendable, CustomTestStringConvertible {
        var spec: String
        var keyLength: Int
        var firstSector: UInt64
        var sha256: String
        var first16: String
        var testDescription: String { spec }
    }

    /// Key bytes (i·37+11), plaintext (i·13+7) over 3 sectors; python computed the
    /// ciphertext (ESSIV: AES sized by the digest, key = hash(key), IV = E(LE64(n)‖0)).
    static let sectorVectors: [SectorVector] = [
        .init(spec: "aes-128-cbc-essiv:sha256", keyLength: 16, firstSector: 0x1234567,
              sha256: "77068a45a4c1f0965288995d7268349f56372bb3081658f469a9eb8b83600873",
              first16: "e01eecdccd9ce12b5e4d4bf21c52095d"),
        .init(spec: "aes-256-cbc-essiv:sha256", keyLength: 32, firstSector: 5,
              sha256: "b0a6f6fdb578e680c093d87bee9b34e260efb0e170077e955ab67633ed70d81c",
              first16: "adf8556d88d046a5f9201d5fcbd375c7"),
        .init(spec: "aes-128-cbc-essiv:md5", keyLength: 16, firstSector: 77,
              sha256: "e546addbd1e63ab2e1a2bf448669e07dc2bfa156884bd9e462abab2f9e4e5697",
              first16: "615184cdaeaa8bf2810858c080b78f87"),
        .init(spec: "aes-256-cbc-plain", keyLength: 32, firstSector: 0x1_0000_0003,
              sha256: "13e2030d35bb998d01a14f5837c71eee4faf5871d9f6899834b5b40cacdec1db",
              first16: "8062724cbd87ef5e6d673109d85bc371"),
        .init(spec: "aes-192-cbc-plain64", keyLength: 24, firstSector: 0x1_0000_0003,
              sha256: "f528b426930315e5cdac0b348a860c75a3ebba2aa7ba943903a2791de77dbf9b",
              first16: "532418bfa6642279f561779715374ee6"),
        // Sector numbers wrap at 2^64 (…fe, …ff, 0).
        .init(spec: "aes-192-xts-plain64", keyLength: 48, firstSector: 0xFFFF_FFFF_FFFF_FFFE,
              sha256: "31015ba364e7032f8ffee48d1b67e04ee4e2036f4679b094724620e7153673af",
              first16: "62a1244b768d5ae5aee3652dbfd1a92b"),
        .init(spec: "aes-128-xts-essiv:sha256", keyLength: 32, firstSector: 42,
              sha256: "32391535742bf05e772e6e50f60a46f81372c1f6c223618eac8c5803d0a7340d",
              first16: "ce9ae80512c9a71c1a2e1f323d6391e4"),
        .init(spec: "aes-256-xts-plain", keyLength: 64, firstSector: 0x2_0000_0001,
              sha256: "f8585a0fdb91d1b0c5f96f1c79e4a3c1119b605b9980d01a8b93ab4dfe64bed0",
              first16: "5b92f015bf629eec24bf156278fc3c16"),
        .init(spec: "aes-128-ecb-plain64", keyLength: 16, firstSector: 9,
              sha256: "787de4d8cb41905ba86f7e3e6f0727b0aefdd859b47ada0420c32743dbe0260d",
              first16: "4a07d73f3400e49e7a4370504758f481"),
    ]

    static func parseSpec(_ s: String, keyLength: Int) throws -> CipherSpec {
        // "aes-128-cbc-essiv:sha256" → cipher_name "aes", cipher_mode "cbc-essiv:sha256".
        let mode = s.split(separator: "-").dropFirst(2).joined(separator: "-")
        return try CipherSpec(luksCipherName: "aes", luksCipherMode: mode, keyBytes: keyLength)
    }

    @Test(arguments: sectorVectors)
    func sectorCipherKnownAnswer(_ v: SectorVector) throws {
        let spec = try Self.parseSpec(v.spec, keyLength: v.keyLength)
        #expect(spec.description == v.spec)
        let key = (0..<v.keyLength).map { UInt8(truncatingIfNeeded: $0 * 37 + 11) }
        let plain = (0..<1536).map { UInt8(truncatingIfNeeded: $0 * 13 + 7) }
        let cipher = try SectorCipher(spec: spec, key: key)
        var data = plain
        try cipher.encrypt(&data, firstSector: v.firstSector)
        #expect(try sha256Hex(data) == v.sha256)
        #expect(hexString(data[0..<16]) == v.first16)
        // Sector by sector gives the same result as one call.
        var pieces = plain
        try pieces.withUnsafeMutableBytes { buffer in
            for i in 0..<3 {
                try cipher.encrypt(
                    UnsafeMutableRawBufferPointer(rebasing: buffer[(512 * i)..<(512 * i + 512)]),
                    firstSector: v.firstSector &+ UInt64(i))
            }
        }
        #expect(pieces == data)
        try cipher.decrypt(&data, firstSector: v.firstSector)
        #expect(data == plain)
        // A copy (other contexts) and a pool agree.
        var copy = plain
        try cipher.makeCopy().encrypt(&copy, firstSector: v.firstSector)
        #expect(try sha256Hex(copy) == v.sha256)
        let pool = try SectorCipherPool(spec: spec, key: SecretBytes(key))
        var pooled = plain
        try pooled.withUnsafeMutableBytes { try pool.encrypt($0, firstSector: v.firstSector) }
        #expect(try sha256Hex(pooled) == v.sha256)
    }

    @Test func ivGenerators() throws {
        let key = [UInt8](repeating: 7, count: 32)
        let plain = try SectorCipher(spec: CipherSpec(algorithm: .aes256, mode: .cbc, ivGenerator: .plain), key: key)
        let plain64 = try SectorCipher(spec: CipherSpec(algorithm: .aes256, mode: .cbc, ivGenerator: .plain64), key: key)
        let sector: UInt64 = 0x0102_0304_0506_0708
        #expect(try plain.iv(forSector: sector) == [8, 7, 6, 5] + [UInt8](repeating: 0, count: 12))
        #expect(try plain64.iv(forSector: sector) == [8, 7, 6, 5, 4, 3, 2, 1] + [UInt8](repeating: 0, count: 8))
        // plain ignores the high half: sectors n and n + 2^32 share an IV.
        #expect(try plain.iv(forSector: 5) == plain.iv(forSector: 5 + (1 << 32)))
    }

    @Test func misalignedBuffersAreRefused() throws {
        let cipher = try SectorCipher(spec: .qemuDefault, key: (0..<64).map { UInt8($0) })
        var data = [UInt8](repeating: 0, count: 1000)
        #expect(throws: CryptoError.notSectorAligned(length: 1000)) { try cipher.encrypt(&data, firstSector: 0) }
        var empty: [UInt8] = []
        try cipher.encrypt(&empty, firstSector: 0)
        #expect(throws: CryptoError.invalidKeyLength(what: "aes-256-xts-plain64 key", length: 32, expected: [64])) {
            try SectorCipher(spec: .qemuDefault, key: [UInt8](repeating: 1, count: 32))
        }
    }

    /// Many threads, one pool: every thread gets consistent results.
    @Test func poolIsThreadSafe() async throws {
        let key = SecretBytes((0..<64).map { UInt8($0 ^ 0x55) })
        let pool = try SectorCipherPool(spec: .qemuDefault, key: key, maximumIdle: 4)
        var reference = [UInt8](repeating: 0xAB, count: 65536)
        try SectorCipher(spec: .qemuDefault, key: key).encrypt(&reference, firstSector: 1000)
        let expected = reference
        try await withThrowingTaskGroup(of: Bool.self) { group in
            for _ in 0..<8 {
                group.addTask {
                    for _ in 0..<20 {
                        var data = [UInt8](repeating: 0xAB, count: 65536)
                        try data.withUnsafeMutableBytes { try pool.encrypt($0, firstSector: 1000) }
                        guard data == expected else { return false }
                        try data.withUnsafeMutableBytes { try pool.decrypt($0, firstSector: 1000) }
                        guard data.allSatisfy({ $0 == 0xAB }) else { return false }
                    }
                    return true
                }
            }
            for try await ok in group { #expect(ok) }
        }
    }

    // MARK: PBKDF2 and digests

    /// RFC 6070 (PBKDF2-HMAC-SHA1).
    @Test(arguments: [
        ("password", "salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6"),
        ("password", "salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957"),
        ("password", "salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1"),
        ("passwordPASSWORDpassword", "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25,
         "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"),
        ("pass\0word", "sa\0lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3"),
    ])
    func pbkdf2RFC6070(_ password: String, _ salt: String, _ iterations: Int, _ length: Int, _ expected: String)
        throws
    {
        let key = try PBKDF2.derive(
            password: Array(password.utf8), salt: Array(salt.utf8), iterations: iterations, hash: .sha1,
            keyLength: length)
        #expect(hexString(key) == expected)
        let secret = try PBKDF2.deriveSecret(
            password: Array(password.utf8), salt: Array(salt.utf8), iterations: iterations, hash: .sha1,
            keyLength: length)
        #expect(hexString(secret.bytes) == expected)
    }

    /// PBKDF2 with the other hashes ("password"/"salt"; python hashlib).
    @Test(arguments: [
        (HashAlgorithm.sha256, 1, 32, "120fb6cffcf8b32c43e7225256c4f837a86548c92ccc35480805987cb70be17b"),
        (.sha256, 2, 32, "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"),
        (.sha256, 4096, 32, "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"),
        (.sha512, 1000, 64,
         "afe6c5530785b6cc6b1c6453384731bd5ee432ee549fd42fb6695779ad8a1c5bf59de69c48f774efc4007d5298f9033c0241d5ab69305e7b64eceeb8d834cfec"),
        (.sha224, 10, 28, "ae79fcd9e9144f7294b020432b6946b9f290bd544b61885ca8093775"),
        (.sha384, 10, 48, "e03f8ca570b98475a9bcd7f73442f3990c3ec87f8815478954ceb62ac2f3d709891aadcb5f5c9485c13e79e20a46a146"),
        (.md5, 10, 16, "d77d26f3ce166f9dc607a5de3a00718c"),
        (.ripemd160, 10, 20, "90adf6d873975e5c3ae31958e7378ff4bb1b2270"),
    ])
    func pbkdf2OtherHashes(_ hash: HashAlgorithm, _ iterations: Int, _ length: Int, _ expected: String) throws {
        try #require(hash.isAvailable)
        let key = try PBKDF2.derive(
            password: Array("password".utf8), salt: Array("salt".utf8), iterations: iterations, hash: hash,
            keyLength: length)
        #expect(hexString(key) == expected)
    }

    @Test func pbkdf2RejectsBadParameters() {
        #expect(throws: CryptoError.self) {
            try PBKDF2.derive(password: [1], salt: [2], iterations: 0, hash: .sha256, keyLength: 32)
        }
        #expect(throws: CryptoError.self) {
            try PBKDF2.derive(password: [1], salt: [2], iterations: 1, hash: .sha256, keyLength: 0)
        }
        #expect(throws: CryptoError.self) {
            try PBKDF2.derive(password: [1], salt: [2], iterations: Int(Int32.max) + 1, hash: .sha256, keyLength: 32)
        }
    }

    @Test func digests() throws {
        let abc = Array("abc".utf8)
        #expect(hexString(try HashAlgorithm.sha1.digest(abc)) == "a9993e364706816aba3e25717850c26c9cd0d89d")
        #expect(
            hexString(try HashAlgorithm.sha256.digest(abc))
                == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(hexString(try HashAlgorithm.md5.digest(abc)) == "900150983cd24fb0d6963f7d28e17f72")
        #expect(hexString(try HashAlgorithm.ripemd160.digest(abc)) == "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc")
        for h in HashAlgorithm.allCases {
            #expect(try h.digest(abc).count == h.digestSize)
            #expect(HashAlgorithm(name: h.name) == h)
        }
        #expect(HashAlgorithm(name: "SHA256") == nil)
    }

    // MARK: AF splitter

    /// Merge of a fixed pattern (i·31+5), python-computed from the format doc's algorithm.
    @Test(arguments: [
        (32, 4000, HashAlgorithm.sha256, "cf2d74ec68c41052cf58a7a9d4a347a21125072f772457d3e61f8782bf9a9760"),
        (64, 4000, .sha512,
         "55ab2a04ded7c03e3f82121dff94139fb93954594e03774ee0501c77f73b479210dc7fa35d0f44b1df1367bdefbe64d94806d0b0f1ecbc4383bb881a11944e24"),
        (16, 7, .sha1, "33e8fd01cd91358b16ba428d34e2b3e0"),
        // 48 bytes over a 32-byte digest: the second block is truncated.
        (48, 3, .sha256,
         "9216afb76f7e42140a54485f6ec11cd2fca67fb76be2f6dd8e351d4edd2b2b66d7d35eabf256da2625d63bfc2f95aecf"),
        (20, 5, .ripemd160, "10d2038bc7871e21c80fbbd12ca8bee262320197"),
    ])
    func afMergeKnownAnswer(_ n: Int, _ stripes: Int, _ hash: HashAlgorithm, _ expected: String) throws {
        let material = (0..<(n * stripes)).map { UInt8(truncatingIfNeeded: $0 * 31 + 5) }
        #expect(hexString(try AFSplitter.merge(material: material, keyLength: n, stripes: stripes, hash: hash)) == expected)
    }

    @Test(arguments: [(64, HashAlgorithm.sha256), (32, .sha1), (16, .sha512), (48, .sha256), (64, .ripemd160)])
    func afRoundTrip(_ n: Int, _ hash: HashAlgorithm) throws {
        let key = (0..<n).map { UInt8(truncatingIfNeeded: $0 &* 91 &+ 3) }
        let material = try AFSplitter.split(key: key, stripes: 4000, hash: hash)
        #expect(material.count == n * 4000)
        #expect(try AFSplitter.merge(material: material, keyLength: n, stripes: 4000, hash: hash) == key)
        // Splitting twice uses fresh randomness.
        #expect(try AFSplitter.split(key: key, stripes: 4000, hash: hash) != material)
        // One flipped bit anywhere loses the key.
        var damaged = material
        damaged[n * 1234 + 5] ^= 1
        #expect(try AFSplitter.merge(material: damaged, keyLength: n, stripes: 4000, hash: hash) != key)
        // One stripe: the material is the key itself.
        #expect(try AFSplitter.split(key: key, stripes: 1, hash: hash) == key)
    }

    @Test func afRejectsBadParameters() {
        #expect(throws: CryptoError.self) { try AFSplitter.split(key: [1, 2], stripes: 0, hash: .sha256) }
        #expect(throws: CryptoError.self) { try AFSplitter.split(key: [1, 2], stripes: 10_000_000, hash: .sha256) }
        #expect(throws: CryptoError.self) {
            try AFSplitter.merge(material: [1, 2, 3], keyLength: 2, stripes: 4, hash: .sha256)
        }
    }

    // MARK: Specs, legacy AES, secrets

    @Test func cipherSpecParsing() throws {
        let d = try CipherSpec(luksCipherName: "aes", luksCipherMode: "xts-plain64", keyBytes: 64)
        #expect(d == .qemuDefault)
        #expect(d.keyLength == 64 && d.luksCipherMode == "xts-plain64" && d.description == "aes-256-xts-plain64")
        let e = try CipherSpec(luksCipherName: "aes", luksCipherMode: "cbc-essiv:sha256", keyBytes: 16)
        #expect(e.algorithm == .aes128 && e.mode == .cbc && e.ivGenerator == .essiv(.sha256))
        #expect(try CipherSpec(luksCipherName: "aes", luksCipherMode: "xts-plain64", keyBytes: 48).algorithm == .aes192)
        // QEMU accepts (and ignores) a hash on plain64.
        #expect(try CipherSpec(luksCipherName: "aes", luksCipherMode: "cbc-plain64:sha1", keyBytes: 32).ivGenerator == .plain64)

        #expect(throws: CryptoError.unsupportedCipher("serpent")) {
            try CipherSpec(luksCipherName: "serpent", luksCipherMode: "xts-plain64", keyBytes: 64)
        }
        #expect(throws: CryptoError.unsupportedCipherMode("ctr")) {
            try CipherSpec(luksCipherName: "aes", luksCipherMode: "ctr-plain64", keyBytes: 32)
        }
        #expect(throws: CryptoError.unsupportedCipherMode("xts")) {
            try CipherSpec(luksCipherName: "aes", luksCipherMode: "xts", keyBytes: 64)
        }
        #expect(throws: CryptoError.unsupportedIVGenerator("benbi")) {
            try CipherSpec(luksCipherName: "aes", luksCipherMode: "cbc-benbi", keyBytes: 32)
        }
        // ESSIV with sha1 would need a 20-byte AES key.
        #expect(throws: CryptoError.unsupportedIVGenerator("essiv:sha1")) {
            try CipherSpec(luksCipherName: "aes", luksCipherMode: "cbc-essiv:sha1", keyBytes: 16)
        }
        #expect(throws: CryptoError.unsupportedHash("whirlpool")) {
            try CipherSpec(luksCipherName: "aes", luksCipherMode: "cbc-essiv:whirlpool", keyBytes: 16)
        }
        for bad in [0, 7, 20, 64] {
            #expect(throws: CryptoError.self) {
                try CipherSpec(luksCipherName: "aes", luksCipherMode: "cbc-plain64", keyBytes: bad)
            }
        }
        for bad in [16, 24, 33, 128] {
            #expect(throws: CryptoError.self) {
                try CipherSpec(luksCipherName: "aes", luksCipherMode: "xts-plain64", keyBytes: bad)
            }
        }
    }

    @Test func legacyKeyIsTruncatedOrZeroPadded() throws {
        #expect(LegacyQcowAES.key(passphrase: Array("pw".utf8)).bytes == [0x70, 0x77] + [UInt8](repeating: 0, count: 14))
        #expect(
            LegacyQcowAES.key(passphrase: Array("0123456789abcdefXYZ".utf8)).bytes == Array("0123456789abcdef".utf8))
        #expect(LegacyQcowAES.spec.description == "aes-128-cbc-plain64")
    }

    @Test func secretBytes() throws {
        let a = SecretBytes([1, 2, 3])
        #expect(a.count == 3 && a.bytes == [1, 2, 3])
        #expect(a.isEqual(to: SecretBytes([1, 2, 3])))
        #expect(!a.isEqual(to: SecretBytes([1, 2, 4])))
        #expect(!a.isEqual(to: SecretBytes([1, 2])))
        let r1 = try SecretBytes.random(count: 32)
        let r2 = try SecretBytes.random(count: 32)
        #expect(!r1.isEqual(to: r2))
        var plain: [UInt8] = [9, 9, 9]
        SecretBytes.wipe(&plain)
        #expect(plain == [0, 0, 0])
    }

    @Test func errorMessagesAreClear() {
        #expect("\(CryptoError.invalidPassphrase)".contains("invalid passphrase"))
        #expect("\(CryptoError.unsupportedCipher("twofish\u{1}"))" == "unsupported cipher 'twofish\\u{1}' (supported: aes-128, aes-192, aes-256)")
        #expect("\(CryptoError.invalidKeySlot(slot: 3, reason: "iteration count is zero"))" == "LUKS key slot 3 is corrupted: iteration count is zero")
    }
}
