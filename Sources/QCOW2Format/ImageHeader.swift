/// Everything stored in cluster 0: the fixed header, its extensions and the backing file name.
public struct ImageHeader: Sendable, Equatable {
    public var header: QCOW2Header
    public var extensions: [HeaderExtension]
    public var backingFileName: String?

    public init(header: QCOW2Header, extensions: [HeaderExtension], backingFileName: String?) {
        self.header = header
        self.extensions = extensions
        self.backingFileName = backingFileName
    }

    /// How many leading bytes of the file `parse` needs, once the fixed header is known.
    public static func bytesNeeded(for header: QCOW2Header) -> Int {
        var end = header.backingFileOffset != 0 ? Int(header.backingFileOffset) : header.clusterSize
        if header.backingFileOffset != 0 {
            end = max(end, Int(header.backingFileOffset) + Int(header.backingFileSize))
        }
        return end
    }

    /// Parses cluster 0 from `bytes`, a prefix of the file (zero-filled past end-of-file).
    /// Throws `.truncated` when the extensions or the backing name lie past the prefix.
    public static func parse(_ bytes: [UInt8]) throws(FormatError) -> ImageHeader {
        let header = try QCOW2Header.parse(bytes)
        let extEnd = header.backingFileOffset != 0 ? Int(header.backingFileOffset) : header.clusterSize
        let start = Int(header.headerLength)
        var extensions: [HeaderExtension] = []
        if start < extEnd {
            // `bytes` may be a prefix of cluster 0: parsing stops at the end marker, and a
            // list that runs past the prefix throws `.truncated` so the caller can read more.
            extensions = try HeaderExtension.parseList(bytes, start: start, end: extEnd)
        }
        // A backing name that starts inside the header leaves no room for extensions; QEMU
        // then reads none and still takes the name from that offset.
        var backing: String?
        if header.backingFileOffset != 0 {
            let r = ByteReader(bytes, structure: "backing file name")
            let name = try r.slice(Int(header.backingFileOffset), Int(header.backingFileSize))
            backing = String(decoding: name, as: UTF8.self)
        }
        let result = ImageHeader(header: header, extensions: extensions, backingFileName: backing)
        try result.validateExtensions()
        return result
    }

    func validateExtensions() throws(FormatError) {
        let unknown = header.unknownIncompatibleFeatureNames(featureNameTable)
        if !unknown.isEmpty { throw .unsupportedIncompatibleFeatures(unknown) }
        let hasFDE = extensions.contains { if case .fullDiskEncryption = $0 { return true } else { return false } }
        if hasFDE && header.cryptMethod != .luks {
            throw .malformed("full disk encryption header extension present, but crypt_method is \(header.cryptMethodRaw)")
        }
        if header.autoclearFeatures.contains(.dataFileRaw) && !header.hasExternalDataFile {
            throw .malformed("data-file-raw requires a data file (autoclear bit 1 set without incompatible bit 2)")
        }
        if header.autoclearFeatures.contains(.dataFileRaw) && backingFileName != nil {
            throw .malformed("data-file-raw is not allowed together with a backing file")
        }
    }

    public var backingFormat: String? {
        for e in extensions { if case let .backingFormat(f) = e { return f } }
        return nil
    }

    public var externalDataFile: String? {
        for e in extensions { if case let .externalDataFile(f) = e { return f } }
        return nil
    }

    public var featureNameTable: [FeatureNameEntry] {
        for e in extensions { if case let .featureNameTable(t) = e { return t } }
        return []
    }

    public var fullDiskEncryption: (offset: UInt64, length: UInt64)? {
        for e in extensions { if case let .fullDiskEncryption(o, l) = e { return (o, l) } }
        return nil
    }

    public var bitmaps: BitmapsExtension? {
        for e in extensions { if case let .bitmaps(b) = e { return b } }
        return nil
    }

    /// Serializes cluster 0 the way QEMU lays it out: header, extensions in QEMU's order
    /// (unknown ones last), end marker, then the backing file name. Returns nil when it
    /// does not fit in one cluster. `backingFileOffset`/`backingFileSize` are recomputed.
    public func serializeCluster0() -> [UInt8]? {
        var h = header
        let order: [UInt32] = [
            HeaderExtension.backingFormatType, HeaderExtension.externalDataFileType,
            HeaderExtension.fullDiskEncryptionType, HeaderExtension.featureNameTableType,
            HeaderExtension.bitmapsType,
        ]
        var ordered: [HeaderExtension] = []
        for t in order { ordered.append(contentsOf: extensions.filter { $0.type == t }) }
        ordered.append(contentsOf: extensions.filter { !order.contains($0.type) })
        let extBytes = HeaderExtension.serializeList(ordered)
        let nameBytes = backingFileName.map { Array($0.utf8) } ?? []
        let nameOffset = Int(h.headerLength) + extBytes.count
        if backingFileName != nil {
            h.backingFileOffset = UInt64(nameOffset)
            h.backingFileSize = UInt32(nameBytes.count)
        } else {
            h.backingFileOffset = 0
            h.backingFileSize = 0
        }
        var out = h.serialize()
        out.append(contentsOf: extBytes)
        out.append(contentsOf: nameBytes)
        guard out.count <= h.clusterSize else { return nil }
        return out
    }
}
