import ArgumentParser
import QCOW2
import QCOW2Crypto

struct Amend: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Change creation options of an existing qcow2 image (like qemu-img amend).")

    @Option(name: .customShort("f"), help: "Image format (qcow2).") var format: String?
    @Option(name: .customShort("o"), parsing: .singleValue, help: "compat=, lazy_refcounts=, refcount_bits=, backing_file=, backing_fmt=")
    var options: [String] = []
    @Flag(name: .customShort("p"), help: "Show progress.") var progress = false
    @Flag(name: .customShort("q"), help: "Quiet.") var quiet = false
    @Flag(name: .customLong("force"), help: "Allow dangerous key-slot changes (overwrite an active slot, erase the last one).")
    var force = false
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image file.") var path: String

    func run() throws {
        try QCOW2Tool.guarded {
            guard !options.isEmpty else { throw ValidationError("Must specify options (-o)") }
            var compat: String?, lazy: Bool?, bits: Int?, backing: String??, backingFormat: String?
            var encrypt: [String: String] = [:]
            for group in options {
                for item in group.split(separator: ",") where !item.isEmpty {
                    let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
                    let (k, v) = (parts[0], parts.count > 1 ? parts[1] : "on")
                    switch k {
                    case "compat": compat = v
                    case "lazy_refcounts": lazy = try CreateOptionParser.onOff(k, v)
                    case "refcount_bits":
                        guard let b = Int(v) else { throw ValidationError("invalid refcount_bits '\(v)'") }
                        bits = b
                    case "backing_file": backing = .some(v.isEmpty ? nil : v)
                    case "backing_fmt": backingFormat = v
                    case "encrypt.keyslot", "encrypt.state", "encrypt.new-secret", "encrypt.old-secret", "encrypt.iter-time":
                        encrypt[k] = v
                    case "size", "cluster_size", "extended_l2", "compression_type", "preallocation", "data_file", "data_file_raw", "encryption":
                        throw ValidationError("Changing the '\(k)' option is not supported by amend")
                    default: throw ValidationError("Invalid parameter '\(k)'")
                    }
                }
            }
            var openOptions = OpenOptions(format: format ?? "qcow2", writable: true)
            openOptions.followBackingFiles = false
            let path = try secret.apply(self.path, to: &openOptions)
            let keySlots = try keySlotAmendment(encrypt)
            let disk = try DiskImage.open(path: path, options: openOptions)
            if let keySlots {
                do { try disk.amendKeySlots(keySlots, secret: openOptions.secrets.passphrase(forDepth: 0)) } catch {
                    try? disk.close()
                    throw error
                }
            }
            let backingChange: (name: String?, format: String?)?
            if let backing {
                backingChange = (backing, backingFormat ?? disk.chain[0].header?.backingFormat)
            } else if let backingFormat {
                backingChange = (disk.chain[0].backingFileName, backingFormat)
            } else {
                backingChange = nil
            }
            if compat != nil || lazy != nil || bits != nil || backingChange != nil {
                try disk.amend(compat: compat, lazyRefcounts: lazy, refcountBits: bits, backing: backingChange)
            }
            try disk.close()
            if progress {
                printProgress(1)
                print("")
            }
        }
    }

    /// The `encrypt.*` key-slot options (qemu-img amend's LUKS options).
    private func keySlotAmendment(_ keys: [String: String]) throws -> KeySlotAmendment? {
        guard !keys.isEmpty else { return nil }
        guard let stateText = keys["encrypt.state"] else { throw ValidationError("Parameter 'encrypt.state' is missing") }
        guard let state = KeySlotAmendment.State(rawValue: stateText) else {
            throw ValidationError("Parameter 'encrypt.state' does not accept value '\(stateText)'")
        }
        let secrets = try secret.secrets()
        var change = KeySlotAmendment(state: state, force: force)
        if let slot = keys["encrypt.keyslot"] {
            guard let n = Int(slot) else { throw ValidationError("Parameter 'encrypt.keyslot' expects a number") }
            change.keySlot = n
        }
        if let id = keys["encrypt.new-secret"] { change.newSecret = try secret.secret(id, in: secrets) }
        if let id = keys["encrypt.old-secret"] { change.oldSecret = try secret.secret(id, in: secrets) }
        if let t = keys["encrypt.iter-time"] {
            guard let ms = UInt64(t), ms > 0 else { throw ValidationError("Parameter 'encrypt.iter-time' expects a positive number") }
            change.iterTime = ms
        }
        return change
    }
}
