import ArgumentParser
import QCOW2

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List, create, apply or delete internal snapshots (like qemu-img snapshot).")

    @Option(name: .customShort("f"), help: "Image format (qcow2).") var format: String?
    @Flag(name: .customShort("l"), help: "List snapshots.") var list = false
    @Option(name: .customShort("c"), help: "Create a snapshot with this name.") var create: String?
    @Option(name: .customShort("a"), help: "Apply (revert to) a snapshot, by ID or name.") var apply: String?
    @Option(name: .customShort("d"), help: "Delete a snapshot, by ID or name.") var delete: String?
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image file.") var path: String

    func run() throws {
        try QCOW2Tool.guarded {
            let actions = [list, create != nil, apply != nil, delete != nil].filter { $0 }.count
            guard actions == 1 else { throw ValidationError("Exactly one of -l, -c, -a, -d is required") }
            if list {
                var options = OpenOptions(format: format)
                options.followBackingFiles = false
                options.allowMissingSecrets = true
                let path = try secret.apply(self.path, to: &options)
                let disk = try DiskImage.open(path: path, options: options)
                let snapshots = try disk.snapshots()
                if !snapshots.isEmpty {
                    print("Snapshot list:")
                    print(SnapshotListing.header)
                    for s in snapshots { writeStandardOutput(SnapshotListing.line(s) + [UInt8(ascii: "\n")]) }
                }
                return
            }
            var options = OpenOptions(format: format, writable: true)
            options.followBackingFiles = true
            let path = try secret.apply(self.path, to: &options)
            let disk = try DiskImage.open(path: path, options: options)
            do {
                if let name = create {
                    try disk.createSnapshot(name: name)
                } else if let key = apply {
                    try disk.applySnapshot(key)
                } else if let key = delete {
                    try disk.deleteSnapshot(key)
                }
            } catch {
                try? disk.close()
                throw error
            }
            try disk.close()
        }
    }
}
