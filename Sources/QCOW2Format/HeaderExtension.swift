/// A header extension (format doc §3). Known kinds are decoded; unknown ones are kept
/// verbatim so that a rewrite of the header preserves them, as QEMU does.
public enum HeaderExtension: Sendable, Equatable {
    case backingFormat(String)
    case featureNameTable([FeatureNameEntry])
    case bitmaps(BitmapsExtension)
    case fullDiskEncryption(offset: UInt64, length: UInt64)
    case externalDataFile(String)
    case unknown(type: UInt32, data: [UInt8])

    public static let endType: UInt32 = 0
    public static let backingFormatType: UInt32 = 0xE279_2ACA
    public static let featureNameTableType: UInt32 = 0x6803_F857
    public static let bitmapsType: UInt32 = 0x2385_2875
    public static let fullDiskEncryptionType: UInt32 = 0x0537_BE77
    public static let externalDataFileType: UInt32 = 0x4441_5441

    public var type: UInt32 {
        switch self {
        case .backingFormat: return Self.backingFormatType
        case .featureNameTable: return Self.featureNameTableType
        case .bitmaps: return Self.bitmapsType
        case .fullDiskEncryption: return Self.fullDiskEncryptionType
        case .externalDataFile: return Self.externalDataFileType
        case let .unknown(type, _): return type
        }
    }

    /// The extension's payload as stored on disk (without header and padding).
    public var payload: [UInt8] {
        switch self {
        case let .backingFormat(s), let .externalDataFile(s):
            return Array(s.utf8)
        case let .featureNameTable(entries):
            return entries.flatMap { $0.serialize() }
        case let .bitmaps(b):
            return b.serialize()
        case let .fullDiskEncryption(offset, length):
            var p: [UInt8] = []
            p.appendBE(offset)
            p.appendBE(length)
            return p
        case let .unknown(_, data):
            return data
        }
    }

    /// Parses the extension list that starts at `header_length` in cluster 0.
    ///
    /// - Parameters:
    ///   - cluster0: the first bytes of the image, at least up to `end`.
    ///   - start: `header_length`.
    ///   - end: `backing_file_offset` if non-zero, else the cluster size.
    public static func parseList(_ cluster0: [UInt8], start: Int, end: Int) throws(FormatError) -> [HeaderExtension] {
        let r = ByteReader(cluster0, structure: "header extension area")
        var offset = start
        var result: [HeaderExtension] = []
        var seen = Set<UInt32>()
        while true {
            // QEMU: "Header extension too large" when the 8-byte extension header crosses the end.
            guard offset <= end - 8 else {
                throw .malformed("header extension at offset \(offset) crosses the end of the extension area (\(end))")
            }
            let type = try r.u32(offset)
            let len = Int(try r.u32(offset + 4))
            if type == endType { break }
            let dataStart = offset + 8
            guard len <= end - dataStart else {
                throw .invalidField("header extension 0x\(String(type, radix: 16)) length", value: UInt64(len), reason: "extension data runs past the end of the extension area (\(end))")
            }
            let data = try r.slice(dataStart, len)
            if type != 0 && seen.contains(type) && type != bitmapsType {
                // Duplicates of known types are invalid; keep the first, as QEMU effectively does.
            }
            seen.insert(type)
            switch type {
            case backingFormatType:
                guard len <= QCOW2Limits.maxBackingFormatLength else {
                    throw .invalidField("backing format name length", value: UInt64(len), reason: "at most 15 bytes")
                }
                result.append(.backingFormat(String(decoding: data, as: UTF8.self)))
            case featureNameTableType:
                var entries: [FeatureNameEntry] = []
                var i = 0
                while i + FeatureNameEntry.size <= data.count {
                    entries.append(FeatureNameEntry(parsing: Array(data[i..<(i + FeatureNameEntry.size)])))
                    i += FeatureNameEntry.size
                }
                result.append(.featureNameTable(entries))
            case bitmapsType:
                result.append(.bitmaps(try BitmapsExtension(parsing: data)))
            case fullDiskEncryptionType:
                guard len == 16 else {
                    throw .invalidField("full disk encryption extension length", value: UInt64(len), reason: "must be 16")
                }
                let er = ByteReader(data, structure: "full disk encryption extension")
                result.append(.fullDiskEncryption(offset: try er.u64(0), length: try er.u64(8)))
            case externalDataFileType:
                result.append(.externalDataFile(String(decoding: data, as: UTF8.self)))
            default:
                result.append(.unknown(type: type, data: data))
            }
            let padded = (len + 7) & ~7
            offset = dataStart + padded
        }
        return result
    }

    /// Serializes a list of extensions followed by the end marker.
    public static func serializeList(_ list: [HeaderExtension]) -> [UInt8] {
        var b: [UInt8] = []
        for ext in list {
            let p = ext.payload
            b.appendBE(ext.type)
            b.appendBE(UInt32(p.count))
            b.append(contentsOf: p)
            b.append(contentsOf: [UInt8](repeating: 0, count: (8 - p.count % 8) % 8))
        }
        b.append(contentsOf: [UInt8](repeating: 0, count: 8))
        return b
    }
}

/// One 48-byte entry of the feature name table.
public struct FeatureNameEntry: Sendable, Equatable {
    public enum Kind: UInt8, Sendable { case incompatible = 0, compatible = 1, autoclear = 2, unknown = 255 }
    public static let size = 48
    public var type: Kind
    public var bit: UInt8
    public var name: String

    public init(type: Kind, bit: UInt8, name: String) {
        self.type = type
        self.bit = bit
        self.name = name
    }

    init(parsing b: [UInt8]) {
        type = Kind(rawValue: b[0]) ?? .unknown
        bit = b[1]
        let nameBytes = b[2..<48].prefix { $0 != 0 }
        name = String(decoding: nameBytes, as: UTF8.self)
    }

    func serialize() -> [UInt8] {
        var b: [UInt8] = [type.rawValue, bit]
        let n = Array(name.utf8.prefix(46))
        b.append(contentsOf: n)
        b.append(contentsOf: [UInt8](repeating: 0, count: 46 - n.count))
        return b
    }

    /// The table QEMU 7.2 writes (for clusters larger than 4 KiB, v3 only).
    public static let qemuDefault: [FeatureNameEntry] = [
        .init(type: .incompatible, bit: 0, name: "dirty bit"),
        .init(type: .incompatible, bit: 1, name: "corrupt bit"),
        .init(type: .incompatible, bit: 2, name: "external data file"),
        .init(type: .incompatible, bit: 3, name: "compression type"),
        .init(type: .incompatible, bit: 4, name: "extended L2 entries"),
        .init(type: .compatible, bit: 0, name: "lazy refcounts"),
        .init(type: .autoclear, bit: 0, name: "bitmaps"),
        .init(type: .autoclear, bit: 1, name: "raw external data"),
    ]
}

/// The bitmaps extension (24 bytes). The engine does not interpret bitmaps yet but keeps them.
public struct BitmapsExtension: Sendable, Equatable {
    public var count: UInt32
    public var directorySize: UInt64
    public var directoryOffset: UInt64

    public init(parsing data: [UInt8]) throws(FormatError) {
        guard data.count == 24 else {
            throw .invalidField("bitmaps extension length", value: UInt64(data.count), reason: "must be 24")
        }
        let r = ByteReader(data, structure: "bitmaps extension")
        count = try r.u32(0)
        let reserved = try r.u32(4)
        directorySize = try r.u64(8)
        directoryOffset = try r.u64(16)
        guard reserved == 0 else {
            throw .invalidField("bitmaps extension reserved field", value: UInt64(reserved), reason: "must be zero")
        }
    }

    func serialize() -> [UInt8] {
        var b: [UInt8] = []
        b.appendBE(count)
        b.appendBE(UInt32(0))
        b.appendBE(directorySize)
        b.appendBE(directoryOffset)
        return b
    }
}
