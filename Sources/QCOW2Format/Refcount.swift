/// A refcount table entry: the host offset of a refcount block (format doc §7.1).
public struct RefcountTableEntry: Sendable, Hashable {
    public static let offsetMask: UInt64 = 0xFFFF_FFFF_FFFF_FE00
    public static let reservedMask: UInt64 = 0x1FF
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public var blockOffset: UInt64 { rawValue & Self.offsetMask }
    public var hasReservedBits: Bool { rawValue & Self.reservedMask != 0 }
}

/// Reads and writes packed refcounts in a refcount block of any width (1–64 bits).
///
/// Widths below 8 bits pack LSB-first inside each byte; widths of 8 bits and more are
/// big-endian integers (format doc §7.3).
public struct RefcountBlockCodec: Sendable, Hashable {
    public let order: UInt32
    public init(order: UInt32) { self.order = order }

    public var bits: Int { 1 << Int(order) }
    public var maxValue: UInt64 { bits == 64 ? .max : (UInt64(1) << UInt64(bits)) - 1 }
    public func entries(clusterSize: Int) -> Int { clusterSize * 8 / bits }

    public func get(_ block: UnsafeRawBufferPointer, _ index: Int) -> UInt64 {
        switch bits {
        case 1, 2, 4:
            let bitOffset = index * bits
            let byte = block[bitOffset / 8]
            return UInt64((byte >> UInt8(bitOffset % 8)) & UInt8(maxValue))
        case 8: return UInt64(block[index])
        case 16: return UInt64(UInt16(bigEndian: block.loadUnaligned(fromByteOffset: index * 2, as: UInt16.self)))
        case 32: return UInt64(UInt32(bigEndian: block.loadUnaligned(fromByteOffset: index * 4, as: UInt32.self)))
        default: return UInt64(bigEndian: block.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self))
        }
    }

    /// Stores `value` (which must be ≤ `maxValue`) at `index`.
    public func set(_ block: UnsafeMutableRawBufferPointer, _ index: Int, _ value: UInt64) {
        switch bits {
        case 1, 2, 4:
            let bitOffset = index * bits
            let shift = UInt8(bitOffset % 8)
            let mask = UInt8(maxValue) << shift
            let old = block[bitOffset / 8]
            block[bitOffset / 8] = (old & ~mask) | ((UInt8(truncatingIfNeeded: value) << shift) & mask)
        case 8: block[index] = UInt8(truncatingIfNeeded: value)
        case 16: block.storeBytes(of: UInt16(truncatingIfNeeded: value).bigEndian, toByteOffset: index * 2, as: UInt16.self)
        case 32: block.storeBytes(of: UInt32(truncatingIfNeeded: value).bigEndian, toByteOffset: index * 4, as: UInt32.self)
        default: block.storeBytes(of: value.bigEndian, toByteOffset: index * 8, as: UInt64.self)
        }
    }
}
