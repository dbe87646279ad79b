import ArgumentParser
import QCOW2

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Compare the guest content of two images (like qemu-img compare).")

    @Option(name: .customShort("f"), help: "Format of the first image.") var firstFormat: String?
    @Option(name: .customShort("F"), help: "Format of the second image.") var secondFormat: String?
    @Flag(name: .customShort("s"), help: "Strict: images of different sizes differ.") var strict = false
    @Argument(help: "First image.") var first: String
    @Argument(help: "Second image.") var second: String

    func run() throws {
        // Exit codes as qemu-img compare: 0 identical, 1 different, 2 error.
        try QCOW2Tool.guarded(2) {
            let a = try DiskImage.open(path: first, options: OpenOptions(format: firstFormat))
            let b = try DiskImage.open(path: second, options: OpenOptions(format: secondFormat))
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
