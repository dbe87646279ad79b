import Foundation
import Testing

/// All encryption suites run one test at a time: creating a LUKS image benchmarks PBKDF2
/// on the CPU (qemu-img's iter-time, ours too), which fails or crawls when many run at once.
@Suite("Encryption", .serialized)
struct EncryptionTests {}

/// Encrypted qcow2 (LUKS, legacy AES) against the real qemu-img/qemu-io: each side reads
/// what the other wrote, byte for byte, and qemu-img check stays clean.
extension EncryptionTests {
@Suite("Encryption: interop with qemu-img/qemu-io")
struct Interop {
    static let size = 4 << 20

    /// qemu-io writes: aligned, unaligned, across clusters, zero writes, up to the end.
    static let qemuWrites = [
        "write -P 0x11 0 65536",
        "write -P 0x22 1000 3000",
        "write -P 0x33 131000 70000",
        "write -z 4096 8192",
        "write -z 140001 1000",
        "write -P 0x44 4190000 4304",
    ]

    /// Our writes on top: in place inside a sector, new clusters with unaligned ends,
    /// copy-on-write across a cluster boundary, unaligned and aligned zero writes, the tail.
    static let ourWrites = [
        "write -P 0x55 100 200",
        "write -P 0x66 300000 100000",
        "write -P 0x77 65000 1000",
        "write -z 320001 5000",
        "write -z 1048576 131072",
        "write -P 0x88 2097152 65536",
        "write -P 0x99 4194000 304",
        "write -P 0xaa 2097300 77",
    ]

    @Test("qemu writes → we read; we write → qemu reads; check clean", arguments: ELUKSCombo.all)
    func luksRoundTrip(_ combo: ELUKSCombo) async throws {
        try await withTempDir("enc-" + combo.testDescription) { dir in
            try await Enc.qemuCreate("e.qcow2", size: "\(Self.size)", options: combo.createOptions, cwd: dir)
            let spec = Enc.opts("e.qcow2")
            var model = EModel(size: Self.size)
            try await Enc.qemuIO(spec, Self.qemuWrites, cwd: dir)
            Self.qemuWrites.forEach { model.apply($0) }

            let ours = try await Enc.ourRaw(spec, cwd: dir)
            let theirs = try await Enc.qemuRaw(spec, cwd: dir)
            #expect(theirs == model.bytes, "qemu's own view differs from the model at \(Enc.firstDifference(theirs, model.bytes))")
            #expect(ours == theirs, "our read of a qemu-written image differs at \(Enc.firstDifference(ours, theirs))")

            let io = try await qcow2(["io"] + Enc.object() + ["--image-opts"] + Self.ourWrites.flatMap { ["-c", $0] } + [spec],
                                     cwd: dir, timeout: 180)
            expectSuccess(io)
            Self.ourWrites.forEach { model.apply($0) }
            let after = try await Enc.qemuRaw(spec, cwd: dir)
            #expect(after == model.bytes, "qemu's read of our writes differs at \(Enc.firstDifference(after, model.bytes))")
            try await Enc.expectCleanCheck(spec, cwd: dir, context: combo.testDescription)
            let oursAfter = try await Enc.ourRaw(spec, cwd: dir)
            #expect(oursAfter == model.bytes, "our read of our writes differs at \(Enc.firstDifference(oursAfter, model.bytes))")
        }
    }

    @Test("Encrypted top over a plain backing file, and a plain top over an encrypted backing file")
    func backingChains() async throws {
        try await withTempDir("enc-chain") { dir in
            try await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "\(Self.size)"], cwd: dir)
            try await qemuIO("base.qcow2", ["write -P 0xab 0 1048576", "write -P 0xcd 2000000 300000"], cwd: dir)
            var model = EModel(size: Self.size)
            model.fill(0, 1048576, 0xab)
            model.fill(2000000, 300000, 0xcd)

            // Encrypted top (qemu-made) over the plain base: our unaligned writes copy the
            // backing data into encrypted clusters.
            try await Enc.qemuCreate("top.qcow2", size: "\(Self.size)", options: ELUKSCombo.all[0].createOptions,
                                     extra: ["-b", "base.qcow2", "-F", "qcow2"], cwd: dir)
            let spec = Enc.opts("top.qcow2")
            #expect(try await Enc.ourRaw(spec, cwd: dir) == model.bytes, "encrypted top over plain base: our read")
            let io = try await qcow2(["io"] + Enc.object() + ["--image-opts"] + Self.ourWrites.flatMap { ["-c", $0] } + [spec],
                                     cwd: dir, timeout: 180)
            expectSuccess(io)
            var topModel = model
            Self.ourWrites.forEach { topModel.apply($0) }
            let viaQemu = try await Enc.qemuRaw(spec, cwd: dir)
            #expect(viaQemu == topModel.bytes, "qemu's read of our COW writes differs at \(Enc.firstDifference(viaQemu, topModel.bytes))")
            try await Enc.expectCleanCheck(spec, cwd: dir, context: "encrypted top")

            // Plain top over the encrypted image: it needs the backing layer's secret.
            let made = try await qcow2(["create", "-q", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", "plain.qcow2"], cwd: dir)
            expectSuccess(made)
            let plainSpec = Enc.opts("plain.qcow2", backingSecret: "sec0", top: false)
            let io2 = try await qcow2(["io"] + Enc.object() + ["--image-opts", "-c", "write -P 0xee 5000 70000", plainSpec],
                                      cwd: dir, timeout: 180)
            expectSuccess(io2)
            topModel.fill(5000, 70000, 0xee)
            let plainView = try await Enc.qemuRaw(plainSpec, cwd: dir)
            #expect(plainView == topModel.bytes, "plain top over encrypted backing differs at \(Enc.firstDifference(plainView, topModel.bytes))")
            #expect(try await Enc.ourRaw(plainSpec, cwd: dir) == topModel.bytes)
            let noSecret = try await qcow2(["convert", "-O", "raw", "plain.qcow2", "x.raw"], cwd: dir)
            expectSane(noSecret)
            #expect(!noSecret.succeeded && noSecret.stderr.contains("secret"), "a missing backing secret must be a clear error: \(noSecret)")
        }
    }

    @Test("qcow2 create makes the image qemu-img makes (layout, info), and qemu reads our data", arguments: [
        ELUKSCombo.all[0], ELUKSCombo.all[5],
    ])
    func createLikeQemu(_ combo: ELUKSCombo) async throws {
        try await withTempDir("enc-create") { dir in
            try await Enc.qemuCreate("q.qcow2", size: "\(Self.size)", options: combo.createOptions, cwd: dir)
            let made = try await qcow2(["create", "-f", "qcow2"] + Enc.object() + ["-o", combo.createOptions, "o.qcow2", "\(Self.size)"],
                                       cwd: dir, timeout: 180)
            expectSuccess(made)
            #expect(made.stdout.contains("fmt=qcow2 encrypt.format=luks encrypt.key-secret=sec0"), "\(made.stdout)")
            #expect(!made.stdout.contains(Enc.secret) && !made.stderr.contains(Enc.secret))
            #expect(try fileSize(dir + "/o.qcow2") == fileSize(dir + "/q.qcow2"), "file size differs from qemu-img's")
            #expect(try readBytes(dir + "/o.qcow2", at: 0, count: 4096) == readBytes(dir + "/q.qcow2", at: 0, count: 4096),
                    "header cluster (with the FDE extension) differs from qemu-img's")

            // qemu-img info: the same encrypt block but for uuid and iteration counts.
            func normalized(_ file: String) async throws -> String {
                let text = try await qemuImg(["info", "--output=json", file], cwd: dir)
                return text.split(separator: "\n")
                    .filter { !$0.contains("uuid") && !$0.contains("iters") && !$0.contains("filename") && !$0.contains("actual-size") }
                    .joined(separator: "\n")
            }
            #expect(try await normalized("o.qcow2") == normalized("q.qcow2"))
            // Our info of qemu's image is exactly qemu-img's, human and JSON.
            for extra in [[String](), ["--output=json"]] {
                let theirs = try await qemuImg(["info"] + extra + ["q.qcow2"], cwd: dir)
                let ours = try await qcow2(["info"] + extra + ["q.qcow2"], cwd: dir)
                expectSuccess(ours)
                #expect(ours.stdout == theirs, "qcow2 info \(extra) differs from qemu-img's:\n\(ours.stdout)\n---\n\(theirs)")
            }

            let spec = Enc.opts("o.qcow2")
            try await Enc.expectCleanCheck(spec, cwd: dir, context: "fresh image")
            let io = try await qcow2(["io"] + Enc.object() + ["--image-opts"] + Self.qemuWrites.flatMap { ["-c", $0] } + [spec],
                                     cwd: dir, timeout: 180)
            expectSuccess(io)
            var model = EModel(size: Self.size)
            Self.qemuWrites.forEach { model.apply($0) }
            let viaQemu = try await Enc.qemuRaw(spec, cwd: dir)
            #expect(viaQemu == model.bytes, "qemu's read of our image differs at \(Enc.firstDifference(viaQemu, model.bytes))")
            try await Enc.expectCleanCheck(spec, cwd: dir, context: "after writes")
            let map = try await run("qemu-img", ["map", "--output=json"] + Enc.object() + ["--image-opts", spec], cwd: dir)
            let ourMap = try await qcow2(["map", "--output=json"] + Enc.object() + ["--image-opts", spec], cwd: dir)
            #expect(ourMap.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == map.stdout.trimmingCharacters(in: .whitespacesAndNewlines),
                    "map differs:\n\(ourMap.stdout)\n---\n\(map.stdout)")
        }
    }

    @Test("convert plain → LUKS → LUKS (other cipher) → plain; compression refused")
    func convertChain() async throws {
        try await withTempDir("enc-convert") { dir in
            try await qemuImg(["create", "-q", "-f", "qcow2", "p.qcow2", "\(Self.size)"], cwd: dir)
            try await qemuIO("p.qcow2", Self.qemuWrites, cwd: dir)
            var model = EModel(size: Self.size)
            Self.qemuWrites.forEach { model.apply($0) }

            let toEnc = try await qcow2(["convert", "-O", "qcow2"] + Enc.object() + ["-o", ELUKSCombo.all[0].createOptions, "p.qcow2", "e1.qcow2"],
                                        cwd: dir, timeout: 180)
            expectSuccess(toEnc)
            #expect(try await Enc.qemuRaw(Enc.opts("e1.qcow2"), cwd: dir) == model.bytes, "plain → LUKS")
            try await Enc.expectCleanCheck(Enc.opts("e1.qcow2"), cwd: dir, context: "plain → LUKS")

            let objects = Enc.object() + Enc.object("sec1", "another one")
            let options = ELUKSCombo.all[3].createOptions.replacingOccurrences(of: "key-secret=sec0", with: "key-secret=sec1")
            let toEnc2 = try await qcow2(["convert", "-O", "qcow2"] + objects + ["-o", options, "--image-opts", Enc.opts("e1.qcow2"), "e2.qcow2"],
                                         cwd: dir, timeout: 180)
            expectSuccess(toEnc2)
            let spec2 = "driver=qcow2,file.filename=e2.qcow2,encrypt.key-secret=sec1"
            #expect(try await Enc.qemuRaw(spec2, objects: objects, cwd: dir) == model.bytes, "LUKS → LUKS")

            try "another one\n".write(toFile: dir + "/pw", atomically: true, encoding: .utf8)
            let toPlain = try await qcow2(["convert", "--password-file", "pw", "-O", "qcow2", "e2.qcow2", "back.qcow2"], cwd: dir, timeout: 180)
            expectSuccess(toPlain)
            let back = try await qemuImg(["info", "back.qcow2"], cwd: dir)
            #expect(!back.contains("encrypted"))
            try await wExpectIdentical("back.qcow2", "p.qcow2", cwd: dir, context: "LUKS → plain")

            let compressed = try await qcow2(["convert", "-c", "-O", "qcow2"] + Enc.object() + ["-o", ELUKSCombo.all[0].createOptions, "p.qcow2", "c.qcow2"],
                                             cwd: dir)
            expectSane(compressed)
            #expect(!compressed.succeeded && compressed.stderr.contains("Compression and encryption not supported at the same time"), "\(compressed)")
        }
    }

    @Test("Legacy AES (crypt_method 1): qemu-img-made images read back equal; writing and creating are refused")
    func legacyAES() async throws {
        try await withTempDir("enc-aes") { dir in
            try await qemuImg(["create", "-q", "-f", "qcow2"] + Enc.object() + ["-o", "encrypt.format=aes,encrypt.key-secret=sec0", "a.qcow2", "\(Self.size)"], cwd: dir)
            let spec = Enc.opts("a.qcow2")
            try await Enc.qemuIO(spec, ["write -P 0x11 0 65536", "write -P 0x22 1024 3072", "write -P 0x33 131072 70144", "write -z 4096 8192"], cwd: dir)
            let theirs = try await Enc.qemuRaw(spec, cwd: dir)
            let ours = try await Enc.ourRaw(spec, cwd: dir)
            #expect(ours == theirs, "legacy AES read differs at \(Enc.firstDifference(ours, theirs))")
            #expect(theirs[131072] == 0x33)

            let write = try await qcow2(["io"] + Enc.object() + ["--image-opts", "-c", "write -P 1 0 512", spec], cwd: dir)
            expectSane(write)
            #expect(!write.succeeded && write.stderr.contains("read-only"), "writing legacy AES must be refused: \(write)")
            let info = try await qcow2(["info", "a.qcow2"], cwd: dir)
            #expect(info.stdout.contains("encrypted: yes") && info.stdout.contains("        format: aes"), "\(info.stdout)")
            #expect(info.stdout == (try await qemuImg(["info", "a.qcow2"], cwd: dir)))

            // qemu-img 7.2 still creates AES images; we refuse (read-only support).
            for o in ["encrypt.format=aes,encrypt.key-secret=sec0", "encryption=on,encrypt.key-secret=sec0"] {
                let create = try await qcow2(["create", "-f", "qcow2"] + Enc.object() + ["-o", o, "n.qcow2", "1M"], cwd: dir)
                expectSane(create)
                #expect(!create.succeeded && create.stderr.contains("AES"), "\(create)")
            }
        }
    }

    @Test("Key slots: amend adds and erases like qemu-img amend")
    func amendKeySlots() async throws {
        try await withTempDir("enc-amend") { dir in
            try await Enc.qemuCreate("k.qcow2", size: "1M", options: ELUKSCombo.all[0].createOptions, cwd: dir)
            let spec = Enc.opts("k.qcow2")
            try await Enc.qemuIO(spec, ["write -P 0x5a 0 4096"], cwd: dir)
            let both = Enc.object() + Enc.object("sec1", "second")
            let add = try await qcow2(["amend"] + both + ["-o", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.iter-time=10", "--image-opts", spec], cwd: dir, timeout: 180)
            expectSuccess(add)
            try await Enc.qemuIO(spec, ["read -P 0x5a 0 4096"], objects: Enc.object("sec0", "second"), cwd: dir)
            let info = try await qemuImg(["info", "--output=json", "k.qcow2"], cwd: dir)
            #expect(info.components(separatedBy: "\"active\": true").count == 3, "two active slots expected: \(info)")

            let overwrite = try await qcow2(["amend"] + both + ["-o", "encrypt.state=active,encrypt.new-secret=sec1,encrypt.keyslot=0", "--image-opts", spec], cwd: dir)
            #expect(!overwrite.succeeded && overwrite.stderr.contains("Refusing to overwrite active keyslot 0 - please erase it first"), "\(overwrite)")

            let erase = try await qcow2(["amend"] + Enc.object() + ["-o", "encrypt.state=inactive,encrypt.old-secret=sec0", "--image-opts", spec], cwd: dir)
            expectSuccess(erase)
            let old = try await run("qemu-io", Enc.object() + ["--image-opts", "-c", "read 0 512", spec], cwd: dir)
            #expect(old.stderr.contains("Invalid password") || old.stdout.contains("Invalid password"), "the erased passphrase must no longer open: \(old)")
            try await Enc.expectCleanCheck(spec, objects: Enc.object("sec0", "second"), cwd: dir, context: "after amend")

            let last = try await qcow2(["amend"] + Enc.object("sec0", "second") + ["-o", "encrypt.state=inactive,encrypt.keyslot=1", "--image-opts", spec], cwd: dir)
            #expect(!last.succeeded && last.stderr.contains("Attempt to erase the only active keyslot 1"), "\(last)")
            #expect(!last.stderr.contains("second"))
        }
    }

    @Test("qcow2 serve of an encrypted image: nbdcopy reads the plain content, writes land encrypted")
    func nbdServe() async throws {
        try await withTempDir("enc-nbd") { dir in
            try await Enc.qemuCreate("n.qcow2", size: "\(Self.size)", options: ELUKSCombo.all[0].createOptions, cwd: dir)
            let spec = Enc.opts("n.qcow2")
            try await Enc.qemuIO(spec, Self.qemuWrites, cwd: dir)
            let expected = try await Enc.qemuRaw(spec, cwd: dir)

            let copy = try await run("nbdcopy", ["--", "[", QCOW2Binary.path, "serve", "-r"] + Enc.object() + ["--image-opts", spec, "]", "nbd.raw"],
                                     cwd: dir, timeout: 180)
            #expect(copy.succeeded, "\(copy)")
            #expect([UInt8](try readFile(dir + "/nbd.raw")) == expected, "NBD export content differs from qemu-img's read")

            try (Enc.secret + "\n").write(toFile: dir + "/pw", atomically: true, encoding: .utf8)
            try Data([UInt8](repeating: 0x6b, count: 1 << 20)).write(to: URL(fileURLWithPath: dir + "/in.raw"))
            let up = try await run("nbdcopy", ["in.raw", "--", "[", QCOW2Binary.path, "serve", "--password-file", "pw", "n.qcow2", "]"],
                                   cwd: dir, timeout: 180)
            #expect(up.succeeded, "\(up)")
            var model = [UInt8](expected)
            for i in 0..<(1 << 20) { model[i] = 0x6b }
            let after = try await Enc.qemuRaw(spec, cwd: dir)
            #expect(after == model, "writes over NBD differ at \(Enc.firstDifference(after, model))")
            try await Enc.expectCleanCheck(spec, cwd: dir, context: "after NBD writes")
        }
    }
}
}
