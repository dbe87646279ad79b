import Foundation
import Testing

// Helpers for the encryption interop suites: LUKS images made by qemu-img, qemu-io and
// qemu-img with `--object secret` + `--image-opts`, and a byte model of the guest disk.

/// One LUKS cipher combination qemu-img can create.
struct ELUKSCombo: Sendable, CustomTestStringConvertible {
    var cipherAlg: String
    var cipherMode: String
    var ivgenAlg: String
    var ivgenHash: String?
    var hashAlg: String

    var testDescription: String {
        "\(cipherAlg)-\(cipherMode)-\(ivgenAlg)\(ivgenHash.map { ":" + $0 } ?? "")/\(hashAlg)"
    }

    /// The `encrypt.*` creation options (iter-time 10 ms keeps the tests fast).
    var createOptions: String {
        var o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=\(cipherAlg),"
            + "encrypt.cipher-mode=\(cipherMode),encrypt.ivgen-alg=\(ivgenAlg),encrypt.hash-alg=\(hashAlg)"
        if let ivgenHash { o += ",encrypt.ivgen-hash-alg=\(ivgenHash)" }
        return o
    }

    static let all: [ELUKSCombo] = [
        .init(cipherAlg: "aes-256", cipherMode: "xts", ivgenAlg: "plain64", hashAlg: "sha256"),
        .init(cipherAlg: "aes-128", cipherMode: "xts", ivgenAlg: "plain64", hashAlg: "sha1"),
        .init(cipherAlg: "aes-192", cipherMode: "xts", ivgenAlg: "plain64", hashAlg: "sha256"),
        .init(cipherAlg: "aes-256", cipherMode: "cbc", ivgenAlg: "essiv", ivgenHash: "sha256", hashAlg: "sha512"),
        .init(cipherAlg: "aes-128", cipherMode: "cbc", ivgenAlg: "plain64", hashAlg: "sha256"),
        .init(cipherAlg: "aes-128", cipherMode: "cbc", ivgenAlg: "essiv", ivgenHash: "sha256", hashAlg: "sha1"),
        .init(cipherAlg: "aes-256", cipherMode: "xts", ivgenAlg: "essiv", ivgenHash: "sha256", hashAlg: "sha512"),
        .init(cipherAlg: "aes-256", cipherMode: "cbc", ivgenAlg: "plain", hashAlg: "sha256"),
    ]
}

enum Enc {
    static let secret = "s3cret pass"

    static func object(_ id: String = "sec0", _ data: String = secret) -> [String] {
        ["--object", "secret,id=\(id),data=\(data)"]
    }

    /// `--image-opts` spec of a qcow2 image whose top layer uses secret `sec0`.
    static func opts(_ file: String, backingSecret: String? = nil, top: Bool = true) -> String {
        var s = "driver=qcow2,file.filename=\(file)"
        if top { s += ",encrypt.key-secret=sec0" }
        if let backingSecret { s += ",backing.encrypt.key-secret=\(backingSecret)" }
        return s
    }

    /// `qemu-img create` of an encrypted image; retried (up to 40 runs) while it fails with
    /// "Unable to get accurate CPU usage": QEMU 7.2 times its first PBKDF2 round (32768
    /// iterations, ~1-3 ms for sha1) with getrusage, whose tick granularity often reads 0 ms,
    /// which it rejects. A failed run costs only those milliseconds.
    static func qemuCreate(_ file: String, size: String, options: String, extra: [String] = [], cwd: String) async throws {
        let args = ["create", "-q", "-f", "qcow2"] + object() + ["-o", options] + extra + [file, size]
        for _ in 0..<39 {
            let r = try await run("qemu-img", args, cwd: cwd, timeout: 180)
            if r.succeeded { return }
            guard r.stderr.contains("Unable to get accurate CPU usage") else { throw ToolFailure(result: r) }
            try? FileManager.default.removeItem(atPath: cwd + "/" + file)
        }
        try await qemuImg(args, cwd: cwd, timeout: 180)
    }

    /// qemu-io on an encrypted image (`--image-opts`); fails on any failed command.
    static func qemuIO(_ spec: String, _ commands: [String], objects: [String] = object(), cwd: String) async throws {
        var args = objects + ["--image-opts"]
        for c in commands { args += ["-c", c] }
        args.append(spec)
        let r = try await run("qemu-io", args, cwd: cwd, timeout: 120)
        guard r.succeeded, !r.stdout.contains("failed"), !r.stderr.contains("failed") else { throw ToolFailure(result: r) }
    }

    /// The guest disk as qemu-img reads it (`convert -O raw` with the secret).
    static func qemuRaw(_ spec: String, objects: [String] = object(), cwd: String) async throws -> [UInt8] {
        let out = cwd + "/qemu-\(UUID().uuidString.prefix(6)).raw"
        try await qemuImg(["convert"] + objects + ["--image-opts", spec, "-O", "raw", out], cwd: cwd)
        defer { try? FileManager.default.removeItem(atPath: out) }
        return [UInt8](try readFile(out))
    }

    /// The guest disk as we read it (`qcow2 convert -O raw` with the secret).
    static func ourRaw(_ spec: String, objects: [String] = object(), cwd: String) async throws -> [UInt8] {
        let out = cwd + "/ours-\(UUID().uuidString.prefix(6)).raw"
        let r = try await qcow2(["convert"] + objects + ["--image-opts", spec, "-O", "raw", out], cwd: cwd, timeout: 120)
        guard r.succeeded else { throw ToolFailure(result: r) }
        defer { try? FileManager.default.removeItem(atPath: out) }
        return [UInt8](try readFile(out))
    }

    /// `qemu-img check` with the secret must be clean.
    static func expectCleanCheck(_ spec: String, objects: [String] = object(), cwd: String, context: String,
                                 sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let r = try await run("qemu-img", ["check"] + objects + ["--output=json", "--image-opts", spec], cwd: cwd, timeout: 120)
        #expect(r.status == 0, "\(context): qemu-img check is not clean: \(r)", sourceLocation: sourceLocation)
        let obj = (try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]) ?? [:]
        for key in ["corruptions", "leaks", "check-errors"] {
            #expect(((obj[key] as? NSNumber)?.intValue ?? 0) == 0, "\(context): qemu-img check reports \(key): \(r.stdout)",
                    sourceLocation: sourceLocation)
        }
    }

    /// First differing offset, for messages.
    static func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> String {
        if a.count != b.count { return "sizes \(a.count) vs \(b.count)" }
        return a.indices.first { a[$0] != b[$0] }.map { "offset \($0)" } ?? "none"
    }
}

/// The guest disk as a byte array, updated by the same writes the tools perform.
struct EModel {
    var bytes: [UInt8]

    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    mutating func fill(_ offset: Int, _ length: Int, _ byte: UInt8) {
        for i in offset..<(offset + length) { bytes[i] = byte }
    }

    /// Applies a qemu-io style command (`write -P X off len`, `write -z off len`).
    mutating func apply(_ command: String) {
        let w = command.split(separator: " ").map(String.init)
        if w.count == 5, w[1] == "-P" {
            fill(Int(w[3])!, Int(w[4])!, UInt8(w[2].dropFirst(2), radix: 16)!)
        } else if w.count >= 4, w[1] == "-z" {
            fill(Int(w[w.count - 2])!, Int(w[w.count - 1])!, 0)
        }
    }
}
