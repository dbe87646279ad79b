import ArgumentParser
import QCOW2

struct MeasureCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "measure", abstract: "Compute the size a new image needs (like qemu-img measure).")

    @Option(name: .customShort("f"), help: "Source format.") var format: String?
    @Option(name: .customShort("O"), help: "Output format (qcow2 or raw).") var outputFormat: String = "raw"
    @Option(name: .customShort("o"), parsing: .singleValue, help: "Creation options, as for create.") var options: [String] = []
    @Option(name: .customLong("size"), help: "Size of an empty image to measure.") var size: String?
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The source image.") var path: String?

    func run() throws {
        try QCOW2Tool.guarded {
            guard (size == nil) != (path == nil) else { throw ValidationError("Either --size N or one filename must be specified.") }
            let (create, backing, _) = try CreateOptionParser.parse(options)
            var o = create
            o.backingFile = backing
            let encryption = try secret.encryptionCreateOptions(CreateOptionParser.encryptKeys)
            let source = try path.map { argument -> DiskImage in
                var o = OpenOptions(format: format)
                let p = try secret.apply(argument, to: &o)
                return try DiskImage.open(path: p, options: o)
            }
            let sizeValue = try size.map { s -> UInt64 in
                guard let v = parseSize(s) else {
                    throw ValidationError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
                }
                guard v <= UInt64(Int64.max) else {
                    throw ValidationError("Invalid image size specified. Must be between 0 and 9223372036854775807.")
                }
                return v
            }
            var r = try Measure.measure(source: source, size: sizeValue, format: outputFormat, options: o)
            if let encryption, outputFormat == "qcow2" {
                // QEMU adds the LUKS area, in whole clusters, to both sizes.
                let area = ImageCreator.luksAreaLength(encryption.luks.cipher)
                let cs = o.clusterSize
                r.required += (area + cs - 1) / cs * cs
                r.fullyAllocated += (area + cs - 1) / cs * cs
            }
            let hasBitmaps = source?.chain.first?.format == "qcow2" && outputFormat == "qcow2" && o.compat != "0.10" && o.compat != "v2"
            switch output {
            case .human:
                print("required size: \(r.required)")
                print("fully allocated size: \(r.fullyAllocated)")
                if hasBitmaps { print("bitmaps size: 0") }
            case .json:
                var fields: [(String, JSONValue)] = []
                if hasBitmaps { fields.append(("bitmaps", .int(0))) }
                fields.append(("required", .int(Int64(r.required))))
                fields.append(("fully-allocated", .int(Int64(r.fullyAllocated))))
                print(JSONValue.object(fields).render(indent: 0))
            }
        }
    }
}
