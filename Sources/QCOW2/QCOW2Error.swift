import QCOW2Format

/// Errors raised by the engine. Each names the file involved so the CLI can print one line.
public enum QCOW2Error: Error, Sendable, CustomStringConvertible {
    /// A system call failed.
    case io(path: String, operation: String, errno: Int32)
    /// The image's metadata is malformed.
    case format(path: String, FormatError)
    /// The image is structurally valid but uses something this engine refuses.
    case unsupported(path: String, String)
    /// A backing chain problem (loop, too deep, missing format, forbidden file).
    case chain(path: String, String)
    /// The caller asked for something invalid (range past the end, bad option).
    case invalidArgument(String)
    /// Corruption detected while serving I/O.
    case corrupt(path: String, String)

    public var description: String {
        switch self {
        case let .io(path, operation, code):
            return "\(path): \(operation) failed: \(errnoDescription(code))"
        case let .format(path, err):
            return "\(path): \(err)"
        case let .unsupported(path, text), let .chain(path, text), let .corrupt(path, text):
            return "\(path): \(text)"
        case let .invalidArgument(text):
            return text
        }
    }
}
