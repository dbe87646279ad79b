import QCOW2

/// One exported disk and how it is offered to clients.
public struct NBDExport: Sendable {
    /// How `NBD_CMD_TRIM` and `NBD_CMD_WRITE_ZEROES` without `NO_HOLE` are applied
    /// (qemu-nbd's `--discard`).
    public enum DiscardMode: String, Sendable, CaseIterable {
        /// TRIM succeeds without doing anything; zero writes keep their clusters allocated.
        case ignore
        /// TRIM discards, zero writes may release clusters.
        case unmap
    }

    /// Whether WRITE payloads of zeros become zero writes (qemu-nbd's `--detect-zeroes`).
    public enum DetectZeroes: String, Sendable, CaseIterable {
        case off
        case on
        /// As `on`, and the clusters may be released when the discard mode is `unmap`.
        case unmap
    }

    /// Name clients ask for; the empty name also selects this export when it is the first.
    public var name: String
    /// Optional human-readable description (`NBD_INFO_DESCRIPTION`).
    public var description: String?
    /// The disk.
    public var device: any NBDDevice
    /// Refuse writes (`NBD_FLAG_READ_ONLY`); forced when the device is not writable.
    public var readOnly: Bool
    public var discard: DiscardMode = .ignore
    public var detectZeroes: DetectZeroes = .off
    /// Offer the `qemu:allocation-depth` metadata context (qemu-nbd's `-A`).
    public var allocationDepth: Bool = false
    /// Ranges aligned to this many bytes can be zeroed with metadata updates only (the qcow2
    /// cluster size of a v3 image); nil when zeroing always costs a data write. Governs
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    public var fastZeroAlignment: UInt64?
    /// Preferred I/O size advertised in `NBD_INFO_BLOCK_SIZE` (a power of two, 512...32 MiB).
    public var preferredBlockSize: UInt32 = 4096

    public init(name: String, description: String? = nil, device: any NBDDevice, readOnly: Bool) {
        self.name = name
        self.description = description
        self.device = device
        self.readOnly = readOnly || !device.isWritable
    }

    /// An export of an opened image: fast zeroing succeeds on qcow2 v3 images without an
    /// external data file, whose zero clusters need no data writes.
    public init(name: String, description: String? = nil, image: DiskImage, readOnly: Bool) {
        self.init(name: name, description: description, device: image, readOnly: readOnly)
        // An external data file may be raw-mapped (data_file_raw): zeroing then writes data.
        if let top = image.chain.first, top.format == "qcow2", top.dataFile == nil, let header = top.header,
           header.header.version >= 3 {
            fastZeroAlignment = image.clusterSize
        }
    }

    var size: UInt64 { device.virtualSize }

    /// The metadata contexts this export offers.
    var contexts: [NBD.MetaContext] { allocationDepth ? [.baseAllocation, .allocationDepth] : [.baseAllocation] }
}
