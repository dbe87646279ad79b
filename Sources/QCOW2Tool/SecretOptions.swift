import ArgumentParser
import QCOW2
import QCOW2Crypto

/// qemu-img's ways of giving secrets to encrypted images, shared by every command:
/// `--object secret,id=ID,data=TEXT|file=PATH[,format=raw|base64]` (repeatable),
/// `--image-opts driver=qcow2,file.filename=PATH,encrypt.key-secret=ID[,backing.encrypt.key-secret=ID2]`,
/// and the friendlier `--password-file PATH` (the whole file is the passphrase of every
/// encrypted layer that has no secret of its own; one trailing newline is stripped so
/// `echo pass > f` works). Secrets never appear in messages.
struct SecretOptions: ParsableArguments {
    @Option(name: .customLong("object"), parsing: .singleValue,
            help: "secret,id=ID,data=TEXT|file=PATH[,format=raw|base64] (repeatable).")
    var objects: [String] = []

    @Option(name: .customLong("password-file"),
            help: "File holding the passphrase of encrypted images (one trailing newline is stripped).")
    var passwordFile: String?

    @Flag(name: .customLong("image-opts"),
          help: "The image argument is an option string: driver=qcow2,file.filename=PATH,encrypt.key-secret=ID,...")
    var imageOpts = false

    /// The secrets defined by `--object`, by id.
    func secrets() throws -> [String: SecretBytes] {
        var result: [String: SecretBytes] = [:]
        for object in objects {
            let fields = try Self.keyValues(object, what: "--object")
            guard fields.first?.key == "secret" || fields.first?.key == "qom-type" && fields.first?.value == "secret" else {
                throw ValidationError("--object: only 'secret' objects are supported")
            }
            var values: [String: String] = [:]
            for (k, v) in fields.dropFirst() { values[k] = v }
            guard let id = values["id"], !id.isEmpty else { throw ValidationError("--object secret: Parameter 'id' is missing") }
            var bytes: [UInt8]
            switch (values["data"], values["file"]) {
            case let (data?, nil): bytes = Array(data.utf8)
            case let (nil, file?):
                guard let contents = Self.readFile(file) else {
                    throw ValidationError("Unable to read secret file '\(file)' for secret '\(id)'")
                }
                bytes = contents
            default: throw ValidationError("secret '\(id)': exactly one of 'data' and 'file' must be given")
            }
            switch values["format"] ?? "raw" {
            case "raw": break
            case "base64":
                guard var decoded = Self.base64Decode(bytes) else {
                    SecretBytes.wipe(&bytes)
                    throw ValidationError("secret '\(id)': the data is not valid base64")
                }
                SecretBytes.wipe(&bytes)
                bytes = decoded
                SecretBytes.wipe(&decoded)
            default: throw ValidationError("secret '\(id)': format must be 'raw' or 'base64'")
            }
            result[id] = SecretBytes(bytes)
            SecretBytes.wipe(&bytes)
        }
        return result
    }

    /// The passphrase from `--password-file`, if given.
    func passwordFromFile() throws -> SecretBytes? {
        guard let passwordFile else { return nil }
        guard var bytes = Self.readFile(passwordFile) else {
            throw ValidationError("Unable to read password file '\(passwordFile)'")
        }
        defer { SecretBytes.wipe(&bytes) }
        if bytes.last == 0x0A { bytes.removeLast() }
        return SecretBytes(bytes)
    }

    /// A secret by id, or qemu-img's error.
    func secret(_ id: String, in secrets: [String: SecretBytes]) throws -> SecretBytes {
        guard let s = secrets[id] else { throw ValidationError("No secret with id '\(id)'") }
        return s
    }

    /// Opens `argument` (a path, or with `--image-opts` an option string): returns the path
    /// and sets the format and secrets in `options`.
    func apply(_ argument: String, to options: inout OpenOptions, imageOpts: Bool? = nil) throws -> String {
        let secrets = try secrets()
        options.secrets.fallback = try passwordFromFile()
        guard imageOpts ?? self.imageOpts else { return argument }
        var path: String?
        for (k, v) in try Self.keyValues(argument, what: "--image-opts") {
            switch k {
            case "driver":
                guard v == "qcow2" || v == "raw" else { throw ValidationError("Unknown driver '\(v)' (qcow2 or raw)") }
                options.format = v
            case "file.filename", "file": path = v
            case "file.driver": guard v == "file" else { throw ValidationError("Only file.driver=file is supported") }
            case "encrypt.format": guard v == "luks" || v == "aes" else { throw ValidationError("Invalid encrypt.format '\(v)'") }
            case "read-only", "cache.no-flush", "cache.direct", "force-share": break
            default:
                // encrypt.key-secret for the top, backing.encrypt.key-secret for depth 1, …
                var key = Substring(k), depth = 0
                while key.hasPrefix("backing.") { key = key.dropFirst("backing.".count); depth += 1 }
                switch key {
                case "encrypt.key-secret": options.secrets.byDepth[depth] = try secret(v, in: secrets)
                case "encrypt.format", "driver", "file.driver": break
                default: throw ValidationError("Invalid option '\(k)' in --image-opts")
                }
            }
        }
        guard let path else { throw ValidationError("--image-opts: 'file.filename' is required") }
        return path
    }

    /// `a=b,c=d` with QEMU's `,,` escape for a literal comma; a bare word is a key with
    /// an empty value.
    static func keyValues(_ text: String, what: String) throws -> [(key: String, value: String)] {
        var items: [String] = []
        var current = ""
        var chars = Array(text)[...]
        while let c = chars.popFirst() {
            if c == "," {
                if chars.first == "," { current.append(","); chars.removeFirst(); continue }
                items.append(current)
                current = ""
            } else {
                current.append(c)
            }
        }
        items.append(current)
        return items.filter { !$0.isEmpty }.map { item in
            guard let eq = item.firstIndex(of: "=") else { return (item, "") }
            return (String(item[..<eq]), String(item[item.index(after: eq)...]))
        }
    }

    /// LUKS creation options from the `encrypt.*` / `encryption` keys of `-o` (nil when no
    /// encryption was asked for), with QEMU's defaults and messages.
    func encryptionCreateOptions(_ keys: [String: String]) throws -> EncryptionCreateOptions? {
        guard !keys.isEmpty else { return nil }
        if let on = keys["encryption"], try CreateOptionParser.onOff("encryption", on) || keys["encrypt.format"] == "aes" {
            throw ValidationError("Creating AES-CBC encrypted images (encrypt.format=aes, encryption=on) is not supported: legacy AES images are read-only here; use encrypt.format=luks")
        }
        guard let format = keys["encrypt.format"] else { throw ValidationError("Parameter 'encrypt.format' is missing") }
        switch format {
        case "luks": break
        case "aes": throw ValidationError("Creating AES-CBC encrypted images (encrypt.format=aes) is not supported: legacy AES images are read-only here; use encrypt.format=luks")
        default: throw ValidationError("Invalid parameter 'encrypt.format': must be 'luks' or 'aes'")
        }
        guard let id = keys["encrypt.key-secret"] else { throw ValidationError("Parameter 'encrypt.key-secret' is required for cipher") }
        let secret = try secret(id, in: try secrets())
        func parse<T>(_ key: String, _ value: (String) -> T?) throws -> T? {
            guard let text = keys[key] else { return nil }
            guard let v = value(text) else { throw ValidationError("Invalid parameter '\(key)': '\(text)' is not supported") }
            return v
        }
        let algorithm = try parse("encrypt.cipher-alg") { CipherSpec.Algorithm(rawValue: $0) } ?? .aes256
        let mode = try parse("encrypt.cipher-mode") { CipherSpec.Mode(rawValue: $0) } ?? .xts
        let ivHash = try parse("encrypt.ivgen-hash-alg") { HashAlgorithm(name: $0) } ?? .sha256
        let ivgen: CipherSpec.IVGenerator = try parse("encrypt.ivgen-alg") { name -> CipherSpec.IVGenerator? in
            switch name {
            case "plain": .plain
            case "plain64": .plain64
            case "essiv": .essiv(ivHash)
            default: nil
            }
        } ?? .plain64
        let hash = try parse("encrypt.hash-alg") { HashAlgorithm(name: $0) } ?? .sha256
        let iterTime = try parse("encrypt.iter-time") { UInt64($0) } ?? 2000
        let spec: CipherSpec
        do { spec = try CipherSpec(algorithm: algorithm, mode: mode, ivGenerator: ivgen) } catch {
            throw ValidationError("\(error)")
        }
        return EncryptionCreateOptions(
            passphrase: secret, luks: LUKS1CreateOptions(cipher: spec, hash: hash, cost: .iterTime(milliseconds: iterTime)))
    }

    /// A whole (small) file, or nil if it cannot be read.
    static func readFile(_ path: String) -> [UInt8]? {
        guard let file = try? FileHandle(path: path, writable: false), let size = try? file.size(), size <= 1 << 20 else {
            return nil
        }
        return try? file.read(count: Int(size), at: 0)
    }

    /// Standard base64 (padding optional, no whitespace), or nil.
    static func base64Decode(_ input: [UInt8]) -> [UInt8]? {
        func value(_ c: UInt8) -> UInt32? {
            switch c {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"): UInt32(c - UInt8(ascii: "A"))
            case UInt8(ascii: "a")...UInt8(ascii: "z"): UInt32(c - UInt8(ascii: "a") + 26)
            case UInt8(ascii: "0")...UInt8(ascii: "9"): UInt32(c - UInt8(ascii: "0") + 52)
            case UInt8(ascii: "+"): 62
            case UInt8(ascii: "/"): 63
            default: nil
            }
        }
        var chars = input
        while chars.last == UInt8(ascii: "=") { chars.removeLast() }
        guard chars.count % 4 != 1 else { return nil }
        var out: [UInt8] = []
        var acc: UInt32 = 0, bits = 0
        for c in chars {
            guard let v = value(c) else { return nil }
            acc = acc << 6 | v
            bits += 6
            if bits >= 8 {
                bits -= 8
                out.append(UInt8(truncatingIfNeeded: acc >> UInt32(bits)))
            }
        }
        return out
    }
}
