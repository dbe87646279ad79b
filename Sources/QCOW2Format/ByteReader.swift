/// Big-endian field access over a byte array, with bounds checked on every read.
///
/// qcow2 metadata is big-endian throughout; these helpers keep decoding explicit, field
/// by field, instead of relying on struct layout.
public struct ByteReader: Sendable {
    public let bytes: [UInt8]
    public let structure: String

    public init(_ bytes: [UInt8], structure: String) {
        self.bytes = bytes
        self.structure = structure
    }

    @inline(__always)
    func require(_ offset: Int, _ count: Int) throws(FormatError) {
        guard offset >= 0, count >= 0, offset <= bytes.count, bytes.count - offset >= count else {
            throw .truncated(structure: structure, needed: offset &+ count, available: bytes.count)
        }
    }

    public func u8(_ offset: Int) throws(FormatError) -> UInt8 {
        try require(offset, 1)
        return bytes[offset]
    }

    public func u16(_ offset: Int) throws(FormatError) -> UInt16 {
        try require(offset, 2)
        return UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }

    public func u32(_ offset: Int) throws(FormatError) -> UInt32 {
        try require(offset, 4)
        return bytes.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt32.self)) }
    }

    public func u64(_ offset: Int) throws(FormatError) -> UInt64 {
        try require(offset, 8)
        return bytes.withUnsafeBytes { UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: UInt64.self)) }
    }

    public func slice(_ offset: Int, _ count: Int) throws(FormatError) -> [UInt8] {
        try require(offset, count)
        return Array(bytes[offset..<(offset + count)])
    }
}

/// Big-endian serialization helpers.
extension Array where Element == UInt8 {
    @inline(__always)
    public mutating func appendBE<T: FixedWidthInteger>(_ value: T) {
        var be = value.bigEndian
        Swift.withUnsafeBytes(of: &be) { append(contentsOf: $0) }
    }

    @inline(__always)
    public mutating func putBE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        var be = value.bigEndian
        Swift.withUnsafeBytes(of: &be) { raw in
            for i in 0..<raw.count { self[offset + i] = raw[i] }
        }
    }
}

/// Loads a big-endian `UInt64` from raw memory without alignment requirements.
@inline(__always)
public func loadBE64(_ raw: UnsafeRawBufferPointer, _ offset: Int) -> UInt64 {
    UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
}
