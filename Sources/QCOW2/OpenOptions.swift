import QCOW2Crypto

/// How an image or chain is opened.
public struct OpenOptions: Sendable {
    /// Format of the top image: "qcow2", "raw", or nil to detect it from the magic.
    public var format: String?
    /// Open the top image for writing (lower layers are always read-only).
    public var writable: Bool = false
    /// Open external data files named by images. QEMU does this by default; a library
    /// caller handling untrusted images may want to refuse it.
    public var allowExternalDataFiles: Bool = true
    /// Follow backing files at all (false: qemu-img's `-U`/`backing=null`-like view of one layer).
    public var followBackingFiles: Bool = true
    /// Detect the format of a backing file that names none (QEMU probes; unsafe for raw).
    public var probeBackingFormat: Bool = false
    /// Maximum number of layers in a chain (QEMU has no cap but crashes around 1,100).
    public var maxChainDepth: Int = 65_536
    /// Byte budget of the L2 slice cache shared by the chain (QEMU's `l2-cache-size`).
    public var l2CacheSize: Int = 4 << 20
    /// Byte budget of the chain index (resolved regions).
    public var indexCacheSize: Int = 32 << 20
    /// Byte budget of the cache of decompressed clusters.
    public var compressedCacheSize: Int = 4 << 20
    /// Show this internal snapshot (ID or name) of the top image instead of its active
    /// state; read-only (qemu-img convert -l / -s).
    public var snapshot: String?
    /// `flush` makes writes durable (fdatasync). False is QEMU's `cache=unsafe`: metadata
    /// is still written in order, but nothing is synced (what qemu-img convert does by default).
    public var durableFlush: Bool = true
    /// Maximum files kept open at once (nil: a quarter of `ulimit -n`, at least 16).
    public var maxOpenFiles: Int?

    /// Passphrases of encrypted layers (LUKS, or legacy AES read-only).
    public var secrets = EncryptionSecrets()
    /// Open encrypted layers that have no passphrase anyway, for metadata only (what
    /// `qemu-img info` does): reading or writing their data then fails.
    public var allowMissingSecrets = false

    public init(format: String? = nil, writable: Bool = false) {
        self.format = format
        self.writable = writable
    }
}
