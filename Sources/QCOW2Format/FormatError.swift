/// An error found while decoding an on-disk qcow2 structure.
///
/// Every case names the field and the offending value, so that a malformed or hostile
/// image produces a message an operator can act on.
public enum FormatError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The buffer ended before the structure did.
    case truncated(structure: String, needed: Int, available: Int)
    /// The first four bytes are not `QFI\xFB`.
    case badMagic(UInt32)
    /// A field holds a value outside what the format (or QEMU) accepts.
    case invalidField(String, value: UInt64, reason: String)
    /// An incompatible feature bit this implementation does not understand is set.
    case unsupportedIncompatibleFeatures([String])
    /// A structure is malformed in a way that is not a single field's fault.
    case malformed(String)

    public var description: String {
        switch self {
        case let .truncated(structure, needed, available):
            return "\(structure) is truncated: needs \(needed) bytes, only \(available) available"
        case let .badMagic(magic):
            return "not a qcow2 image (magic 0x\(String(magic, radix: 16)))"
        case let .invalidField(field, value, reason):
            return "invalid \(field) \(value) (0x\(String(value, radix: 16))): \(reason)"
        case let .unsupportedIncompatibleFeatures(names):
            return "unsupported qcow2 feature(s): \(names.joined(separator: ", "))"
        case let .malformed(text):
            return text
        }
    }
}
