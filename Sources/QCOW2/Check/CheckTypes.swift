#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What a consistency check may repair (QEMU's `BdrvCheckMode`).
public struct CheckRepair: OptionSet, Sendable, Hashable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    /// Free leaked clusters: lower refcounts that are higher than the number of references.
    public static let leaks = CheckRepair(rawValue: 1)
    /// Fix everything else that can be fixed: refcounts that are too low (rebuilding the
    /// refcount structure when needed), copied flags, entries QEMU drops, the snapshot table.
    public static let errors = CheckRepair(rawValue: 2)

    /// `qemu-img check -r all`.
    public static let all: CheckRepair = [.leaks, .errors]
}

/// The outcome of one check pass, with the fields of qemu-img's `ImageCheck`.
public struct CheckResult: Sendable, Equatable {
    /// Inconsistencies that may harm data (refcounts too low, bad entries, …).
    public var corruptions: Int = 0
    /// Clusters whose refcount is higher than the number of references.
    public var leaks: Int = 0
    /// Internal errors that kept the check from being complete.
    public var checkErrors: Int = 0
    public var corruptionsFixed: Int = 0
    public var leaksFixed: Int = 0
    /// One past the last cluster in use, in bytes (0 when unknown).
    public var imageEndOffset: Int64 = 0
    /// Clusters of the virtual disk.
    public var totalClusters: Int64 = 0
    /// Guest clusters mapped in the active L1/L2 tables.
    public var allocatedClusters: Int64 = 0
    public var fragmentedClusters: Int64 = 0
    public var compressedClusters: Int64 = 0

    public init() {}

    /// QEMU's `qcow2_add_check_result`.
    mutating func add(_ other: CheckResult, allocationInfo: Bool) {
        corruptions += other.corruptions
        leaks += other.leaks
        checkErrors += other.checkErrors
        corruptionsFixed += other.corruptionsFixed
        leaksFixed += other.leaksFixed
        if allocationInfo {
            imageEndOffset = other.imageEndOffset
            totalClusters = other.totalClusters
            allocatedClusters = other.allocatedClusters
            fragmentedClusters = other.fragmentedClusters
            compressedClusters = other.compressedClusters
        }
    }
}

/// A check pass that could not complete (qemu-img: "Check failed: <reason>", exit 1).
public struct CheckFailure: Error, Sendable, CustomStringConvertible {
    /// The reason, worded like `strerror` ("Input/output error", "File too large", …).
    public var reason: String
    /// What had been counted when the check stopped.
    public var partial: CheckResult

    public var description: String { "Check failed: \(reason)" }
}

/// Internal: the check stopped (QEMU returns a negative errno from the check functions).
struct CheckStop: Error {
    var code: Int32
    var reason: String { errnoDescription(code) }

    static let io = CheckStop(code: EIO)
    static let tooBig = CheckStop(code: EFBIG)
    static let invalid = CheckStop(code: EINVAL)
    static let noMemory = CheckStop(code: ENOMEM)

    /// The errno of any error thrown by file I/O (EIO for anything else).
    static func from(_ error: any Error) -> CheckStop {
        if let stop = error as? CheckStop { return stop }
        if case let QCOW2Error.io(_, _, code)? = error as? QCOW2Error { return CheckStop(code: code) }
        return .io
    }
}
