import ArgumentParser
import QCOW2

struct Rebase: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Change the backing file of an image (like qemu-img rebase).")

    @Option(name: .customShort("f"), help: "Image format.") var format: String?
    @Option(name: .customShort("b"), help: "New backing file (empty: none).") var backing: String?
    @Option(name: .customShort("F"), help: "Format of the new backing file.") var backingFormat: String?
    @Flag(name: .customShort("u"), help: "Unsafe: only rewrite the backing file name.") var unsafe = false
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image file.") var path: String

    func run() throws {
        try QCOW2Tool.guarded {
            var options = OpenOptions(format: format)
            let path = try secret.apply(self.path, to: &options)
            guard let backing else { throw ValidationError("Must specify backing file (-b) or use '-b \"\"'") }
            let callback: (@Sendable (Double) -> Void)? = progress ? { @Sendable f in printProgress(f) } : nil
            try ChainOperations.rebase(path: path, newBacking: backing, newFormat: backingFormat, unsafe: unsafe,
                                       format: options.format, secrets: options.secrets, progress: callback)
            if progress {
                printProgress(1)
                print("")
            }
        }
    }
}

struct Commit: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write an image's data into its backing file (like qemu-img commit).")

    @Option(name: .customShort("f"), help: "Image format.") var format: String?
    @Option(name: .customShort("b"), help: "The base image to commit into (default: the backing file).") var base: String?
    @Flag(name: .customShort("d"), help: "Do not empty the image afterwards.") var keep = false
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image file.") var path: String

    func run() throws {
        try QCOW2Tool.guarded {
            var options = OpenOptions(format: format)
            let path = try secret.apply(self.path, to: &options)
            let callback: (@Sendable (Double) -> Void)? = progress ? { @Sendable f in printProgress(f) } : nil
            try ChainOperations.commit(path: path, base: base, keepTop: keep, format: options.format,
                                       secrets: options.secrets, progress: callback)
            if progress {
                printProgress(1)
                print("")
            }
            if !quiet { print("Image committed.") }
        }
    }
}
