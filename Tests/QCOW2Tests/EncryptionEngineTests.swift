import Dispatch
import Foundation
import QCOW2
import QCOW2Crypto
import Testing

/// The library API of encrypted images: create, open with a secret, concurrent writes.
extension EncryptionTests {
@Suite("Encryption: engine API")
struct Engine {
    static func create(_ path: String, size: UInt64, passphrase: String, clusterSize: UInt64 = 65536,
                       extendedL2: Bool = false) throws {
        var o = CreateOptions(size: size)
        o.clusterSize = clusterSize
        o.extendedL2 = extendedL2
        o.encryption = EncryptionCreateOptions(
            passphrase: SecretBytes(Array(passphrase.utf8)), luks: LUKS1CreateOptions(cost: .iterations(1000)))
        try ImageCreator.create(path: path, options: o)
    }

    static func open(_ path: String, passphrase: String?, writable: Bool) throws -> DiskImage {
        var o = OpenOptions(format: "qcow2", writable: writable)
        if let passphrase { o.secrets.byDepth[0] = SecretBytes(Array(passphrase.utf8)) }
        return try DiskImage.open(path: path, options: o)
    }

    @Test("Concurrent byte-granular writes into the same sectors are not lost (partial-sector RMW is atomic)")
    func concurrentPartialSectorWrites() async throws {
        try await withTempDir("enc-conc") { dir in
            let path = dir + "/c.qcow2"
            try Self.create(path, size: 1 << 20, passphrase: "pw")
            let disk = try Self.open(path, passphrase: "pw", writable: true)
            let threads = 8, span = 4096
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                for i in stride(from: t, to: span, by: threads) {
                    var b = UInt8(t + 1)
                    try? withUnsafeBytes(of: &b) { try disk.write(at: UInt64(i), from: $0) }
                }
            }
            try disk.close()
            let reopened = try Self.open(path, passphrase: "pw", writable: false)
            var out = [UInt8](repeating: 0, count: span)
            try out.withUnsafeMutableBytes { try reopened.read(at: 0, into: $0) }
            let wrong = out.indices.filter { out[$0] != UInt8($0 % threads + 1) }
            #expect(wrong.isEmpty, "\(wrong.count) bytes lost, first at \(wrong.first ?? -1)")
            #expect(reopened.chain[0].encryption?.format == "luks")
        }
    }

    @Test("Small clusters and extended L2: our writes read back by qemu", arguments: [(4096, false), (16384, true), (65536, true)])
    func geometries(_ clusterSize: Int, _ extendedL2: Bool) async throws {
        try await withTempDir("enc-geo") { dir in
            let path = dir + "/g.qcow2"
            try Self.create(path, size: 2 << 20, passphrase: Enc.secret, clusterSize: UInt64(clusterSize), extendedL2: extendedL2)
            let spec = Enc.opts("g.qcow2")
            let writes = ["write -P 0x21 100 5000", "write -P 0x22 70000 1", "write -z 3000 20000", "write -P 0x23 1048000 100000"]
            let io = try await qcow2(["io"] + Enc.object() + ["--image-opts"] + writes.flatMap { ["-c", $0] } + [spec], cwd: dir, timeout: 120)
            expectSuccess(io)
            var model = EModel(size: 2 << 20)
            writes.forEach { model.apply($0) }
            let viaQemu = try await Enc.qemuRaw(spec, cwd: dir)
            #expect(viaQemu == model.bytes, "differs at \(Enc.firstDifference(viaQemu, model.bytes))")
            try await Enc.expectCleanCheck(spec, cwd: dir, context: "cluster \(clusterSize) extended_l2 \(extendedL2)")
        }
    }

    @Test("Compressed writes into an encrypted image are refused; info opens without the secret")
    func refusals() async throws {
        try await withTempDir("enc-api") { dir in
            let path = dir + "/r.qcow2"
            try Self.create(path, size: 1 << 20, passphrase: "pw")
            let disk = try Self.open(path, passphrase: "pw", writable: true)
            let cluster = [UInt8](repeating: 7, count: 65536)
            #expect(throws: (any Error).self) { try cluster.withUnsafeBytes { try disk.writeCompressed(at: 0, from: $0) } }
            try disk.close()
            var o = OpenOptions(format: "qcow2")
            o.allowMissingSecrets = true
            let meta = try DiskImage.open(path: path, options: o)
            #expect(meta.chain[0].encryption?.unlocked == false)
            var b = [UInt8](repeating: 0, count: 512)
            // Unallocated data reads as zeros without the key; nothing to decrypt.
            try b.withUnsafeMutableBytes { try meta.read(at: 0, into: $0) }
            #expect(throws: (any Error).self) { try Self.open(path, passphrase: "wrong", writable: false) }
            #expect(throws: (any Error).self) { try Self.open(path, passphrase: nil, writable: false) }
        }
    }
}
}
