import Foundation
import Testing

/// The CLI's secret plumbing (`--object secret` forms, `--password-file`) and the commands
/// that gained encryption support beyond read/write: measure, commit.
extension EncryptionTests {
@Suite("Encryption: CLI")
struct CLI {
    @Test("Secrets from data=, file=, format=base64 and --password-file all open the image")
    func secretForms() async throws {
        try await withTempDir("enc-cli") { dir in
            try await Enc.qemuCreate("e.qcow2", size: "1M", options: ELUKSCombo.all[0].createOptions, cwd: dir)
            let spec = Enc.opts("e.qcow2")
            try await Enc.qemuIO(spec, ["write -P 0x3c 512 1024"], cwd: dir)
            try Enc.secret.write(toFile: dir + "/s.txt", atomically: true, encoding: .utf8)
            try (Enc.secret + "\n").write(toFile: dir + "/pw", atomically: true, encoding: .utf8)
            let b64 = Data(Enc.secret.utf8).base64EncodedString()
            let forms: [[String]] = [
                Enc.object() + ["--image-opts", spec],
                ["--object", "secret,id=sec0,file=s.txt", "--image-opts", spec],
                ["--object", "secret,id=sec0,data=\(b64),format=base64", "--image-opts", spec],
                ["--password-file", "pw", "e.qcow2"],
            ]
            for form in forms {
                let r = try await qcow2(["io", "-r"] + form.dropLast() + ["-c", "read -P 0x3c 512 1024", form.last!], cwd: dir, timeout: 60)
                #expect(r.succeeded, "\(form): \(r)")
            }
            // A password file whose content is not the passphrase.
            try "nope\n".write(toFile: dir + "/bad", atomically: true, encoding: .utf8)
            let bad = try await qcow2(["io", "-r", "--password-file", "bad", "-c", "read 0 512", "e.qcow2"], cwd: dir)
            #expect(!bad.succeeded && bad.stderr.contains("Invalid password") && !bad.stderr.contains("nope"), "\(bad)")
        }
    }

    @Test("convert -n --target-image-opts into an existing LUKS image")
    func targetImageOpts() async throws {
        try await withTempDir("enc-target") { dir in
            try await Enc.qemuCreate("t.qcow2", size: "1M", options: ELUKSCombo.all[0].createOptions, cwd: dir)
            let data = Data((0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 9) })
            try data.write(to: URL(fileURLWithPath: dir + "/in.raw"))
            let spec = Enc.opts("t.qcow2")
            let r = try await qcow2(["convert", "-n"] + Enc.object() + ["-f", "raw", "--target-image-opts", "in.raw", spec], cwd: dir, timeout: 60)
            expectSuccess(r)
            #expect(try await Enc.qemuRaw(spec, cwd: dir) == [UInt8](data))
            try await Enc.expectCleanCheck(spec, cwd: dir, context: "convert -n target")
            let noN = try await qcow2(["convert"] + Enc.object() + ["--target-image-opts", "in.raw", spec], cwd: dir)
            #expect(!noN.succeeded && noN.stderr.contains("--target-image-opts requires use of -n flag"), "\(noN)")
        }
    }

    @Test("measure -o encrypt.format=luks matches qemu-img measure")
    func measure() async throws {
        try await withTempDir("enc-measure") { dir in
            for extra in ["", ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc", ",cluster_size=4k"] {
                let args = ["measure", "--output=json"] + Enc.object() + ["-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0" + extra, "--size", "10G"]
                var theirs = try await run("qemu-img", args, cwd: dir, timeout: 120)
                for _ in 0..<39 where !theirs.succeeded && theirs.stderr.contains("Unable to get accurate CPU usage") { theirs = try await run("qemu-img", args, cwd: dir, timeout: 120) }
                let ours = try await qcow2(args, cwd: dir)
                expectSuccess(ours)
                #expect(ours.stdout == theirs.stdout, "\(extra): ours \(ours.stdout) qemu \(theirs.stdout)")
            }
        }
    }

    @Test("commit of an encrypted top into a plain base, with the top's secret")
    func commit() async throws {
        try await withTempDir("enc-commit") { dir in
            try await qemuImg(["create", "-q", "-f", "qcow2", "base.qcow2", "2M"], cwd: dir)
            try await qemuIO("base.qcow2", ["write -P 0x11 0 1M"], cwd: dir)
            try await Enc.qemuCreate("top.qcow2", size: "2M", options: ELUKSCombo.all[0].createOptions,
                                     extra: ["-b", "base.qcow2", "-F", "qcow2"], cwd: dir)
            let spec = Enc.opts("top.qcow2")
            try await Enc.qemuIO(spec, ["write -P 0x22 1000 100000"], cwd: dir)
            let before = try await Enc.qemuRaw(spec, cwd: dir)
            let r = try await qcow2(["commit"] + Enc.object() + ["--image-opts", spec], cwd: dir, timeout: 120)
            expectSuccess(r)
            try await qemuImg(["convert", "-O", "raw", "base.qcow2", "after.raw"], cwd: dir)
            #expect([UInt8](try readFile(dir + "/after.raw")) == before, "the base does not hold the committed data")
            try await Enc.expectCleanCheck(spec, cwd: dir, context: "emptied top")
        }
    }
}
}
