import Foundation
import Testing

/// Encrypted images that cannot be opened: one clear line on stderr, no crash, and never
/// the secret in the message.
extension EncryptionTests {
@Suite("Encryption: errors")
struct Errors {
    static let wrong = "WrongPassphrase42"

    /// Runs `qcow2 convert` of `spec` to raw and expects a clean failure mentioning `needle`.
    func expectFailure(_ args: [String], _ needle: String, cwd: String, _ context: String,
                       sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let r = try await qcow2(args, cwd: cwd, timeout: 180)
        expectSane(r, sourceLocation: sourceLocation)
        #expect(!r.succeeded, "\(context): should fail: \(r)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(needle), "\(context): expected '\(needle)' in: \(r.stderr)", sourceLocation: sourceLocation)
        #expect(isOneLineMessage(r.stderr), "\(context): not one line: \(r.stderr)", sourceLocation: sourceLocation)
        for secret in [Enc.secret, Self.wrong] {
            #expect(!r.stderr.contains(secret) && !r.stdout.contains(secret), "\(context): the secret leaked: \(r)",
                    sourceLocation: sourceLocation)
        }
    }

    @Test("Wrong passphrase, missing secret, unknown secret id, corrupted key material")
    func unlockFailures() async throws {
        try await withTempDir("enc-err") { dir in
            try await Enc.qemuCreate("e.qcow2", size: "1M", options: ELUKSCombo.all[0].createOptions, cwd: dir)
            let spec = Enc.opts("e.qcow2")
            try await Enc.qemuIO(spec, ["write -P 0x12 0 4096"], cwd: dir)

            try await expectFailure(["convert"] + Enc.object("sec0", Self.wrong) + ["--image-opts", spec, "-O", "raw", "x.raw"],
                                    "Invalid password, cannot unlock any keyslot", cwd: dir, "wrong passphrase")
            try await expectFailure(["convert", "-O", "raw", "e.qcow2", "x.raw"], "a secret is needed", cwd: dir, "no secret")
            try await expectFailure(["io", "-r", "-c", "read 0 512", "e.qcow2"], "encrypt.key-secret", cwd: dir, "io without secret")
            try await expectFailure(["io", "--image-opts", "-c", "read 0 512", spec], "No secret with id 'sec0'", cwd: dir, "unknown id")
            try await expectFailure(["check"] + Enc.object("sec0", Self.wrong) + ["--image-opts", spec], "Invalid password", cwd: dir, "check, wrong")
            // info needs no secret, like qemu-img info.
            let info = try await qcow2(["info", "e.qcow2"], cwd: dir)
            expectSuccess(info)

            // Key material of slot 0 starts 4096 bytes into the LUKS area (at 0x40000).
            let area = try readBE64("\(dir)/e.qcow2", at: 0x78)
            #expect(area == 0x40000)
            try patch("\(dir)/e.qcow2", at: area + 4096 + 1000, [UInt8](repeating: 0xEE, count: 64))
            try await expectFailure(["convert"] + Enc.object() + ["--image-opts", spec, "-O", "raw", "x.raw"],
                                    "Invalid password", cwd: dir, "corrupted key material")
            // A broken LUKS magic.
            try patch("\(dir)/e.qcow2", at: area, [0, 0, 0, 0])
            try await expectFailure(["convert"] + Enc.object() + ["--image-opts", spec, "-O", "raw", "x.raw"],
                                    "LUKS", cwd: dir, "bad LUKS magic")
        }
    }

    @Test("FDE extension outside the file, crypt_method without the extension, legacy AES without a secret")
    func malformedHeaders() async throws {
        try await withTempDir("enc-hdr") { dir in
            try await Enc.qemuCreate("e.qcow2", size: "1M", options: ELUKSCombo.all[0].createOptions, cwd: dir)
            let spec = Enc.opts("e.qcow2")
            try wCopy(dir + "/e.qcow2", dir + "/far.qcow2")
            try patchBE64(dir + "/far.qcow2", at: 0x78, 1 << 40)
            try await expectFailure(["convert"] + Enc.object() + ["--image-opts", Enc.opts("far.qcow2"), "-O", "raw", "x.raw"],
                                    "full disk encryption", cwd: dir, "FDE offset past EOF")
            try wCopy(dir + "/e.qcow2", dir + "/long.qcow2")
            try patchBE64(dir + "/long.qcow2", at: 0x80, UInt64.max - 10)
            try await expectFailure(["convert"] + Enc.object() + ["--image-opts", Enc.opts("long.qcow2"), "-O", "raw", "x.raw"],
                                    "full disk encryption", cwd: dir, "FDE length overflow")
            _ = spec

            try await qemuImg(["create", "-q", "-f", "qcow2", "p.qcow2", "1M"], cwd: dir)
            try patchBE32(dir + "/p.qcow2", at: 32, 2)
            try await expectFailure(["convert"] + Enc.object() + ["--image-opts", Enc.opts("p.qcow2"), "-O", "raw", "x.raw"],
                                    "0x0537be77", cwd: dir, "LUKS without extension")
            try patchBE32(dir + "/p.qcow2", at: 32, 1)
            try await expectFailure(["convert", "-O", "raw", "p.qcow2", "x.raw"], "secret", cwd: dir, "AES without secret")
            try patchBE32(dir + "/p.qcow2", at: 32, 7)
            try await expectFailure(["convert", "-O", "raw", "p.qcow2", "x.raw"], "crypt_method", cwd: dir, "unknown method")
        }
    }
}
}
