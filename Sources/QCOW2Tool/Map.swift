import ArgumentParser
import QCOW2

struct Map: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show the allocation map of an image and its chain (like qemu-img map).")

    @OptionGroup var image: ImageOptions
    @Option(name: .customLong("output"), help: "human or json.")
    var output: OutputFormat = .human
    @Option(name: .customLong("start-offset"), help: "First byte to map.") var startOffset: UInt64 = 0
    @Option(name: .customLong("max-length"), help: "Bytes to map.") var maxLength: UInt64?
    @Argument(help: "The image file.") var path: String

    func run() throws {
        try QCOW2Tool.guarded {
            var options = image.openOptions()
            let path = try image.secret.apply(self.path, to: &options)
            let disk = try DiskImage.open(path: path, options: options)
            let length = maxLength ?? disk.virtualSize
            var extents = try disk.allocationMap(offset: startOffset, length: length)
            if extents.isEmpty {
                // qemu-img prints one empty extent for an empty range.
                extents = [AllocationExtent(start: startOffset, length: 0, depth: 0, present: false, zero: false, data: false,
                                            offset: nil, compressed: false, file: nil)]
            }
            switch output {
            case .json:
                let lines = extents.map { e -> String in
                    var s = "{ \"start\": \(e.start), \"length\": \(e.length), \"depth\": \(e.depth), \"present\": \(e.present), \"zero\": \(e.zero), \"data\": \(e.data)"
                    if let o = e.offset { s += ", \"offset\": \(o)" }
                    return s + "}"
                }
                print("[" + lines.joined(separator: ",\n") + "]")
            case .human:
                print(pad("Offset") + pad("Length") + pad("Mapped to") + "File")
                for e in extents where e.data {
                    guard let offset = e.offset, let file = e.file else {
                        throw ValidationError("File contains external, encrypted or compressed clusters.")
                    }
                    if !e.zero { print(pad(hex(e.start)) + pad(hex(e.length)) + pad(hex(offset)) + file) }
                }
            }
        }
    }

    private func hex(_ v: UInt64) -> String { v == 0 ? "0" : "0x" + String(v, radix: 16) }
    private func pad(_ s: String) -> String { s.count >= 16 ? s : s + String(repeating: " ", count: 16 - s.count) }
}
