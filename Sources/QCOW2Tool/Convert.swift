import ArgumentParser
import QCOW2
#if canImport(Glibc)
import Glibc
#endif

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Convert an image or chain to another format (like qemu-img convert).")

    @OptionGroup var image: ImageOptions
    @Option(name: .customShort("O"), help: "Output format (raw).") var outputFormat: String = "raw"
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Option(name: .customShort("S"), help: "Minimum run of zero bytes to leave sparse (default 4k; 0 disables).")
    var sparseSize: String = "4k"
    @Option(name: .customShort("m"), help: "Parallel workers (default 4).") var workers: Int = 4
    @Argument(help: "Source image.") var source: String
    @Argument(help: "Destination file.") var destination: String

    func run() throws {
        try QCOW2Tool.guarded {
            guard outputFormat == "raw" else {
                throw ValidationError("output format '\(outputFormat)' is not supported by this build (raw is)")
            }
            guard let sparse = parseSize(sparseSize), sparse % 512 == 0 || sparse == 0 else {
                throw ValidationError("invalid -S value '\(sparseSize)': must be a multiple of 512")
            }
            guard (1...16).contains(workers) else { throw ValidationError("-m must be between 1 and 16") }
            let disk = try DiskImage.open(path: source, options: image.openOptions())
            var export = RawExport()
            export.sparseSize = Int(sparse)
            export.threads = workers
            let showProgress = progress
            if showProgress { printProgress(0) }
            let callback: (@Sendable (Double) -> Void)? = showProgress ? { @Sendable f in printProgress(f) } : nil
            try export.run(source: disk, destination: destination, progress: callback)
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
