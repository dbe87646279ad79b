import ArgumentParser
import QCOW2

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Compare the guest content of two images (like qemu-img compare).")

    @Option(name: .customShort("f"), help: "Format of the first image.") var firstFormat: String?
    @Option(name: .customShort("F"), help: "Format of the second image.") var secondFormat: String?
    @Flag(name: .customShort("s"), help: "Strict: images of different sizes differ.") var strict = false
    @OptionGroup var secret: SecretOptions
    @Argument(help: "First image.") var first: String
    @Argument(help: "Second image.") var second: String

    func run() throws {
        // Exit codes as qemu-img compare: 0 identical, 1 different, 2 error.
        try QCOW2Tool.guarded(2) {
            var optionsA = OpenOptions(format: firstFormat), optionsB = OpenOptions(format: secondFormat)
            let pathA = try secret.apply(first, to: &optionsA), pathB = try secret.apply(second, to: &optionsB)
            let a = try DiskImage.open(path: pathA, options: optionsA)
            let b = try DiskImage.open(path: pathB, options: optionsB)
            if a.virtualSize != b.virtualSize {
                if strict {
                    print("Strict mode: Image size mismatch!")
                    throw ExitCode(1)
                }
                print("Warning: Image size mismatch!")
            }
            if let offset = try ContentComparison.firstDifference(a, b) {
                print("Content mismatch at offset \(offset)!")
                throw ExitCode(1)
            }
            print("Images are identical.")
        }
    }
}
