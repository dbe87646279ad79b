import ArgumentParser
import QCOW2

struct Resize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Change the virtual size of an image (like qemu-img resize).")

    @Option(name: .customShort("f"), help: "Image format.") var format: String?
    @Flag(name: .customLong("shrink"), help: "Allow shrinking (data past the new end is lost).") var shrink = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @OptionGroup var secret: SecretOptions
    @Argument(parsing: .allUnrecognized, help: "The image file, then the new size (SIZE, +SIZE or -SIZE).")
    var arguments: [String] = []

    func run() throws {
        try QCOW2Tool.guarded {
            guard arguments.count == 2 else { throw ValidationError("Expecting image file name and size") }
            let size = arguments[1]
            var options = OpenOptions(format: format, writable: true)
            let path = try secret.apply(arguments[0], to: &options)
            let disk = try DiskImage.open(path: path, options: options)
            var newSize: UInt64
            if size.hasPrefix("+") || size.hasPrefix("-") {
                guard let delta = parseSize(String(size.dropFirst())) else { throw ValidationError("Invalid image size specified") }
                if size.hasPrefix("+") {
                    let (s, o) = disk.virtualSize.addingReportingOverflow(delta)
                    guard !o else { throw ValidationError("Image size is too large") }
                    newSize = s
                } else {
                    guard delta <= disk.virtualSize else { throw ValidationError("New image size must be positive") }
                    newSize = disk.virtualSize - delta
                }
            } else {
                guard let s = parseSize(size) else { throw ValidationError("Invalid image size specified") }
                newSize = s
            }
            guard newSize > 0 else { throw ValidationError("New image size must be positive") }
            if disk.chain.first?.format == "qcow2" && newSize % 512 != 0 {
                throw ValidationError("The new size must be a multiple of 512")
            }
            try disk.resize(to: newSize, allowShrink: shrink)
            try disk.close()
            if !quiet { print("Image resized.") }
        }
    }
}
