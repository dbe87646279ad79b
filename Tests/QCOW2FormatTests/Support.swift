import QCOW2Format
import Testing

/// Decodes a hex string ("5146 49fb …", whitespace and `|` ignored).
func hex(_ s: String) -> [UInt8] {
    let digits = s.filter { $0.isHexDigit }
    precondition(digits.count % 2 == 0, "odd number of hex digits")
    var out: [UInt8] = []
    var i = digits.startIndex
    while i < digits.endIndex {
        let j = digits.index(i, offsetBy: 2)
        out.append(UInt8(digits[i..<j], radix: 16)!)
        i = j
    }
    return out
}

func be32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
func be64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }

extension Array where Element == UInt8 {
    mutating func put32(_ v: UInt32, at offset: Int) { replaceSubrange(offset..<(offset + 4), with: be32(v)) }
    mutating func put64(_ v: UInt64, at offset: Int) { replaceSubrange(offset..<(offset + 8), with: be64(v)) }
    /// Zero-pads to `count` bytes.
    func padded(to count: Int) -> [UInt8] { self + [UInt8](repeating: 0, count: Swift.max(0, count - self.count)) }
}

/// A 48-byte feature name table entry, built by hand.
func featureEntry(_ type: UInt8, _ bit: UInt8, _ name: String) -> [UInt8] {
    ([type, bit] + Array(name.utf8)).padded(to: 48)
}

/// The feature name table QEMU 7.2 writes (format doc §3.3), built by hand.
let qemuFeatureTableBytes: [UInt8] =
    featureEntry(0, 0, "dirty bit") + featureEntry(0, 1, "corrupt bit") + featureEntry(0, 2, "external data file")
    + featureEntry(0, 3, "compression type") + featureEntry(0, 4, "extended L2 entries")
    + featureEntry(1, 0, "lazy refcounts") + featureEntry(2, 0, "bitmaps") + featureEntry(2, 1, "raw external data")

/// The first 0x70 bytes of `qemu-img create -f qcow2 x.qcow2 1G` (format doc §15).
let worked1GHeader = hex("""
    5146 49fb 0000 0003 0000 0000 0000 0000
    0000 0000 0000 0010 0000 0000 4000 0000
    0000 0000 0000 0002 0000 0000 0003 0000
    0000 0000 0001 0000 0000 0001 0000 0000
    0000 0000 0000 0000 0000 0000 0000 0000
    0000 0000 0000 0000 0000 0000 0000 0000
    0000 0004 0000 0070 0000 0000 0000 0000
    """)

/// Cluster 0 of the §15 worked example: header, feature table extension, end marker at 0x1F8.
func worked1GCluster0() -> [UInt8] {
    var b = worked1GHeader
    b += be32(0x6803_F857) + be32(384) + qemuFeatureTableBytes
    precondition(b.count == 0x1F8)
    return b.padded(to: 65536)
}

/// Runs `body` and returns the FormatError it throws (recording an issue if it does not).
@discardableResult
func formatError(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> FormatError? {
    do {
        try body()
        Issue.record("expected a FormatError, got success", sourceLocation: sourceLocation)
        return nil
    } catch let error as FormatError {
        return error
    } catch {
        Issue.record("expected a FormatError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// Expects `.invalidField(field, …)`.
func expectInvalidField(_ field: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    guard let e = formatError(body, sourceLocation: sourceLocation) else { return }
    if case let .invalidField(name, _, _) = e {
        #expect(name == field, "invalid field \(name), expected \(field): \(e)", sourceLocation: sourceLocation)
    } else {
        Issue.record("expected invalidField(\(field)), got \(e)", sourceLocation: sourceLocation)
    }
}
