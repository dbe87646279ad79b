import ArgumentParser
import QCOW2
#if canImport(Glibc)
import Glibc
#endif

@main
struct QCOW2Tool: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qcow2",
        abstract: "Inspect, convert and benchmark qcow2 disk images (qemu-img compatible).",
        subcommands: [Create.self, Info.self, IO.self, Resize.self, Rebase.self, Commit.self, MeasureCommand.self, Amend.self, Snapshot.self, Map.self, Convert.self, Compare.self, Bench.self, Serve.self, CheckCommand.self]
    )

    /// Runs `body`, turning any error into qemu-img's one-line `qcow2: message` on stderr.
    static func guarded(_ code: Int32 = 1, _ body: () throws -> Void) throws {
        do {
            try body()
        } catch let error as ExitCode {
            throw error
        } catch {
            printError("qcow2: \(error)")
            throw ExitCode(code)
        }
    }
}

func printError(_ text: String) {
    fflush(nil)
    let line = Array((text + "\n").utf8)
    _ = line.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

/// Shared options for opening images.
struct ImageOptions: ParsableArguments {
    @Option(name: .customShort("f"), help: "Image format (qcow2 or raw); detected when omitted.")
    var format: String?

    @Flag(name: .customLong("probe-backing-format"), help: "Probe the format of backing files that do not name one (unsafe for raw).")
    var probeBackingFormat = false

    @Option(name: .customLong("cache-size"), help: "Byte budget of the chain index cache.")
    var cacheSize: Int?

    @OptionGroup var secret: SecretOptions

    func openOptions() -> OpenOptions {
        var o = OpenOptions(format: format)
        o.probeBackingFormat = probeBackingFormat
        if let cacheSize { o.indexCacheSize = cacheSize }
        return o
    }
}

enum OutputFormat: String, ExpressibleByArgument {
    case human, json
}
