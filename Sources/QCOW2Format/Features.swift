/// Incompatible feature bits (header offset 72). An unknown set bit makes the image unreadable.
public struct IncompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Refcounts may be wrong (lazy refcounts in use or unclean shutdown).
    public static let dirty = IncompatibleFeatures(rawValue: 1 << 0)
    /// Metadata may be corrupt; open read-only only.
    public static let corrupt = IncompatibleFeatures(rawValue: 1 << 1)
    /// Guest data lives in an external data file.
    public static let externalDataFile = IncompatibleFeatures(rawValue: 1 << 2)
    /// `compression_type` (byte 104) is not deflate.
    public static let compressionType = IncompatibleFeatures(rawValue: 1 << 3)
    /// 128-bit L2 entries with 32 subclusters.
    public static let extendedL2 = IncompatibleFeatures(rawValue: 1 << 4)

    public static let known: IncompatibleFeatures = [.dirty, .corrupt, .externalDataFile, .compressionType, .extendedL2]
}

/// Compatible feature bits (header offset 80). Unknown bits are ignored and preserved.
public struct CompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let lazyRefcounts = CompatibleFeatures(rawValue: 1 << 0)
}

/// Autoclear feature bits (header offset 88). A writer clears the ones it does not maintain.
public struct AutoclearFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let bitmaps = AutoclearFeatures(rawValue: 1 << 0)
    public static let dataFileRaw = AutoclearFeatures(rawValue: 1 << 1)
    public static let known: AutoclearFeatures = [.bitmaps, .dataFileRaw]
}

/// Compression algorithm for compressed clusters (header byte 104).
public enum CompressionType: UInt8, Sendable, Hashable, CustomStringConvertible {
    case deflate = 0
    case zstd = 1

    /// The name qemu-img uses (`compression-type` in `info`, `compression_type=` in `-o`).
    public var description: String {
        switch self {
        case .deflate: return "zlib"
        case .zstd: return "zstd"
        }
    }
}

/// `crypt_method` (header offset 32).
public enum CryptMethod: UInt32, Sendable, Hashable {
    case none = 0
    case aes = 1
    case luks = 2
}
