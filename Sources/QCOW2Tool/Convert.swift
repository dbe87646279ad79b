import ArgumentParser
import QCOW2
#if canImport(Glibc)
import Glibc
#endif

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Convert images or chains to qcow2 or raw (like qemu-img convert).")

    @OptionGroup var image: ImageOptions
    @Option(name: .customShort("O"), help: "Output format (qcow2 or raw; default raw).") var outputFormat: String = "raw"
    @Flag(name: .customShort("c"), help: "Compress the output clusters (qcow2).") var compress = false
    @Option(name: .customShort("o"), parsing: .singleValue, help: "Output creation options, as for create.") var options: [String] = []
    @Option(name: .customShort("B"), help: "Backing file of the output: only the difference is written.") var outputBacking: String?
    @Option(name: .customShort("F"), help: "Format of the -B backing file.") var outputBackingFormat: String?
    @Flag(name: .customShort("n"), help: "Do not create the target; it must exist.") var noCreate = false
    @Flag(name: .customLong("target-image-opts"), help: "The destination is an option string (driver=qcow2,file.filename=PATH,encrypt.key-secret=ID); needs -n.")
    var targetImageOpts = false
    @Option(name: .customShort("l"), help: "Convert this internal snapshot of the source (ID or name, or snapshot.name=/snapshot.id=).")
    var snapshotParam: String?
    @Option(name: .customShort("s"), help: "Convert the internal snapshot with this ID or name (deprecated qemu-img form).")
    var snapshotID: String?
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Option(name: .customShort("t"), help: "Cache mode of the output: unsafe (default, like qemu-img: no sync), writeback, none, directsync, writethrough (sync at the end).")
    var cacheMode: String = "unsafe"
    @Option(name: .customShort("S"), help: "Minimum run of zero bytes to leave sparse (default 4k; 0 disables).")
    var sparseSize: String = "4k"
    @Option(name: .customShort("m"), help: "Parallel workers (default 4).") var workers: Int = 4
    @Argument(help: "Source image(s) followed by the destination.") var files: [String]

    func run() throws {
        try QCOW2Tool.guarded {
            guard files.count >= 2 else { throw ValidationError("Expecting at least one source and a destination") }
            let sourcePaths = Array(files.dropLast())
            var targetOptions = OpenOptions(format: outputFormat, writable: true)
            if targetImageOpts && !noCreate { throw ValidationError("--target-image-opts requires use of -n flag") }
            let destination = try image.secret.apply(files.last!, to: &targetOptions, imageOpts: targetImageOpts)
            guard outputFormat == "raw" || outputFormat == "qcow2" else {
                throw ValidationError("Unknown output format '\(outputFormat)' (qcow2 or raw)")
            }
            if compress && outputFormat != "qcow2" { throw ValidationError("Compression not supported for this file format") }
            guard let sparse = parseSize(sparseSize), sparse % 512 == 0 else {
                throw ValidationError("Invalid buffer size for sparse output specified: -S must be a multiple of 512")
            }
            guard (1...16).contains(workers) else { throw ValidationError("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16") }
            var sourceOptions = image.openOptions()
            if let p = snapshotParam ?? snapshotID {
                guard sourcePaths.count == 1 else { throw ValidationError("No support for concatenating multiple snapshot") }
                // -s ID selects by ID; -l takes an ID or name, or snapshot.id=/snapshot.name= parts.
                sourceOptions.snapshot = snapshotParam ?? "snapshot.id=\(p)"
            }
            let sources = try sourcePaths.map { argument in
                var o = sourceOptions
                let path = try image.secret.apply(argument, to: &o)
                return try DiskImage.open(path: path, options: o)
            }
            let total = sources.reduce(UInt64(0)) { $0 + $1.virtualSize }
            var (create, extraBacking, extraFormat) = try CreateOptionParser.parse(options)
            if outputFormat == "qcow2" { create.encryption = try image.secret.encryptionCreateOptions(CreateOptionParser.encryptKeys) }
            if compress && create.encryption != nil {
                throw ValidationError("Compression and encryption not supported at the same time")
            }
            let backing = outputBacking ?? extraBacking
            let backingFormat = outputBackingFormat ?? extraFormat ?? (backing != nil ? "qcow2" : nil)
            if !noCreate {
                create.size = create.size == 0 ? total : create.size
                switch outputFormat {
                case "qcow2":
                    create.backingFile = backing
                    create.backingFormat = backingFormat
                    try ImageCreator.create(path: destination, options: create)
                default:
                    guard backing == nil else { throw ValidationError("Backing file not supported for file format 'raw'") }
                    try RawImage.create(path: destination, size: total)
                }
            }
            guard ["unsafe", "writeback", "none", "directsync", "writethrough"].contains(cacheMode) else {
                throw ValidationError("Invalid cache option: \(cacheMode)")
            }
            var openOptions = targetOptions
            openOptions.writable = true
            openOptions.durableFlush = cacheMode != "unsafe"
            openOptions.followBackingFiles = true
            // The new image's own secret, else --target-image-opts / --password-file (-n).
            if let created = create.encryption?.passphrase { openOptions.secrets.fallback = created }
            let target = try DiskImage.open(path: destination, options: openOptions)
            var converter = ImageConverter()
            converter.sparseSize = Int(sparse)
            converter.threads = workers
            converter.compress = compress
            // With a backing file, zero ranges may hide backing data and must be compared too.
            converter.targetMayHaveData = noCreate || backing != nil
            if backing != nil, target.chainDepth > 1 {
                var backingOptions = OpenOptions(format: backingFormat)
                backingOptions.secrets.fallback = try image.secret.passwordFromFile()
                converter.backing = try DiskImage.open(path: target.chain[0].fullBackingFileName ?? "", options: backingOptions)
            }
            let showProgress = progress
            if showProgress { printProgress(0) }
            let callback: (@Sendable (Double) -> Void)? = showProgress ? { @Sendable f in printProgress(f) } : nil
            try converter.run(sources: sources, target: target, progress: callback)
            try target.close()
            if showProgress {
                printProgress(1)
                print("")
            }
        }
    }
}

/// qemu-img's progress line: `    (12.34/100%)` redrawn with a carriage return.
func printProgress(_ fraction: Double) {
    let pct = (fraction * 10000).rounded() / 100
    let whole = Int(pct)
    let frac = Int(((pct - Double(whole)) * 100).rounded())
    let text = "    (\(whole).\(frac < 10 ? "0" : "")\(frac)/100%)\r"
    print(text, terminator: "")
    fflush(nil)
}

/// Parses qemu-style sizes: "4096", "4k", "1M", "2G", "1T" (binary units).
func parseSize(_ text: String) -> UInt64? {
    var digits = text
    var multiplier: UInt64 = 1
    if let last = text.last, last.isLetter {
        digits.removeLast()
        switch last.lowercased() {
        case "b": multiplier = 1
        case "k": multiplier = 1 << 10
        case "m": multiplier = 1 << 20
        case "g": multiplier = 1 << 30
        case "t": multiplier = 1 << 40
        case "p": multiplier = 1 << 50
        case "e": multiplier = 1 << 60
        default: return nil
        }
    }
    let parsed = digits.hasPrefix("0x") ? UInt64(digits.dropFirst(2), radix: 16) : UInt64(digits)
    guard let value = parsed else { return nil }
    let (result, overflow) = value.multipliedReportingOverflow(by: multiplier)
    return overflow ? nil : result
}
