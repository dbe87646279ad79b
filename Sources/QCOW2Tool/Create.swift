import ArgumentParser
import QCOW2
import QCOW2Format

struct Create: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Create a new image (like qemu-img create).")

    @Option(name: .customShort("f"), help: "Image format (qcow2 or raw).") var format: String = "raw"
    @Option(name: .customShort("b"), help: "Backing file.") var backingFile: String?
    @Option(name: .customShort("F"), help: "Backing file format.") var backingFormat: String?
    @Flag(name: .customShort("u"), help: "Do not open the backing file (the size must be given).") var unsafe = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Option(name: .customShort("o"), parsing: .singleValue, help: "Format options, comma separated (cluster_size=, compat=, lazy_refcounts=, refcount_bits=, extended_l2=, compression_type=, preallocation=, data_file=, data_file_raw=, backing_file=, backing_fmt=).")
    var options: [String] = []
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image to create.") var path: String
    @Argument(help: "Virtual size (e.g. 1G); defaults to the backing file's size.") var size: String?

    func run() throws {
        try QCOW2Tool.guarded {
            var (o, extraBacking, extraFormat) = try CreateOptionParser.parse(options)
            let backing = backingFile ?? extraBacking, backingFmt = backingFormat ?? extraFormat
            o.backingFile = backing
            o.backingFormat = backingFmt
            if format == "qcow2" { o.encryption = try secret.encryptionCreateOptions(CreateOptionParser.encryptKeys) }
            if let size {
                guard let s = parseSize(size) else { throw ValidationError("Invalid image size specified: '\(size)'") }
                o.size = s
            } else if let b = backing, !unsafe {
                let resolved = b.hasPrefix("/") ? b : (path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) + "/" + b : b)
                var backingOptions = OpenOptions(format: backingFmt)
                backingOptions.allowMissingSecrets = true
                let disk = try DiskImage.open(path: resolved, options: backingOptions)
                o.size = disk.virtualSize
            } else {
                throw ValidationError("Image creation needs a size parameter")
            }
            if let b = backing, !unsafe, size != nil {
                // Like qemu-img: make sure the backing file can be opened.
                let resolved = b.hasPrefix("/") ? b : (path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) + "/" + b : b)
                var backingOptions = OpenOptions(format: backingFmt)
                backingOptions.allowMissingSecrets = true
                _ = try DiskImage.open(path: resolved, options: backingOptions)
            }
            switch format {
            case "qcow2":
                if !quiet {
                    let encrypt = CreateOptionParser.encryptKeyOrder.compactMap { k in CreateOptionParser.encryptKeys[k].map { " \(k)=\($0)" } }.joined()
                    var line = "Formatting '\(path)', fmt=qcow2\(encrypt) cluster_size=\(o.clusterSize) extended_l2=\(o.extendedL2 ? "on" : "off")\(o.preallocation != "off" || CreateOptionParser.explicitKeys.contains("preallocation") ? " preallocation=" + o.preallocation : "") compression_type=\(o.compressionType) size=\(o.size)"
                    if o.compat != "1.1" || CreateOptionParser.explicitKeys.contains("compat") { line += " compat=\(o.compat)" }
                    if let b = backing { line += " backing_file=\(b)" }
                    if let f = backingFmt, backing != nil { line += " backing_fmt=\(f)" }
                    if let d = o.dataFile { line += " data_file=\(d)" }
                    if o.dataFileRaw { line += " data_file_raw=on" }
                    line += " lazy_refcounts=\(o.lazyRefcounts ? "on" : "off") refcount_bits=\(o.refcountBits)"
                    print(line)
                }
                try ImageCreator.create(path: path, options: o)
            case "raw":
                guard backing == nil else { throw ValidationError("raw images cannot have a backing file") }
                if !quiet { print("Formatting '\(path)', fmt=raw size=\(o.size)") }
                try RawImage.create(path: path, size: (o.size + 511) & ~511)
            default:
                throw ValidationError("unknown format '\(format)' (qcow2 or raw)")
            }
        }
    }

}

/// Parses qemu-img's `-o key=value,...` creation options.
enum CreateOptionParser {
    /// Keys given explicitly in the last `parse` (qemu-img prints those even at their default).
    nonisolated(unsafe) static var explicitKeys: Set<String> = []
    /// The `encrypt.*` and `encryption` keys of the last `parse` (see `SecretOptions`).
    nonisolated(unsafe) static var encryptKeys: [String: String] = [:]
    /// qemu-img's order of the encryption keys in its "Formatting" line.
    static let encryptKeyOrder = ["encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode",
                                  "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time"]

    static func parse(_ groups: [String]) throws -> (CreateOptions, backing: String?, backingFormat: String?) {
        explicitKeys = []
        encryptKeys = [:]
        var o = CreateOptions(size: 0)
        var backing: String?, backingFmt: String?
        for group in groups {
            for item in group.split(separator: ",") where !item.isEmpty {
                let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
                let (k, v) = (parts[0], parts.count > 1 ? parts[1] : "on")
                explicitKeys.insert(k)
                switch k {
                case "cluster_size":
                    guard let s = parseSize(v) else { throw ValidationError("invalid cluster_size '\(v)'") }
                    o.clusterSize = s
                case "compat": o.compat = v
                case "lazy_refcounts": o.lazyRefcounts = try onOff(k, v)
                case "refcount_bits":
                    guard let b = Int(v) else { throw ValidationError("invalid refcount_bits '\(v)'") }
                    o.refcountBits = b
                case "extended_l2": o.extendedL2 = try onOff(k, v)
                case "compression_type":
                    switch v {
                    case "zlib": o.compressionType = .deflate
                    case "zstd": o.compressionType = .zstd
                    default: throw ValidationError("Parameter 'compression_type' does not accept value '\(v)'")
                    }
                case "preallocation": o.preallocation = v
                case "data_file": o.dataFile = v
                case "data_file_raw": o.dataFileRaw = try onOff(k, v)
                case _ where encryptKeyOrder.contains(k): encryptKeys[k] = v
                case "backing_file": backing = v
                case "backing_fmt": backingFmt = v
                case "size":
                    guard let s = parseSize(v) else { throw ValidationError("invalid size '\(v)'") }
                    o.size = s
                default: throw ValidationError("Invalid parameter '\(k)'")
                }
            }
        }
        return (o, backing, backingFmt)
    }

    static func onOff(_ key: String, _ v: String) throws -> Bool {
        switch v {
        case "on", "true", "yes": return true
        case "off", "false", "no": return false
        default: throw ValidationError("Parameter '\(key)' expects 'on' or 'off'")
        }
    }
}
