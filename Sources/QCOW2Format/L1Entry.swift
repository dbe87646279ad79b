/// An L1 table entry: the host offset of an L2 table plus the copied flag (format doc §4.2).
public struct L1Entry: Sendable, Hashable {
    public static let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
    public static let reservedMask: UInt64 = 0x7F00_0000_0000_01FF
    public static let copiedFlag: UInt64 = 1 << 63

    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(l2Offset: UInt64, copied: Bool) {
        rawValue = (l2Offset & Self.offsetMask) | (copied ? Self.copiedFlag : 0)
    }

    /// Host offset of the L2 table; 0 means no L2 table (everything below it unallocated).
    public var l2Offset: UInt64 { rawValue & Self.offsetMask }
    public var isCopied: Bool { rawValue & Self.copiedFlag != 0 }
    public var hasReservedBits: Bool { rawValue & Self.reservedMask != 0 }
}
