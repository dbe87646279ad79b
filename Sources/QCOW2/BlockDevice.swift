/// A virtual disk: what the CLI and the NBD server need from any image or chain.
public protocol BlockDevice: AnyObject, Sendable {
    /// Size of the virtual disk in bytes.
    var virtualSize: UInt64 { get }
    /// Reads `buffer.count` bytes at `offset` (must lie inside the disk).
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    /// The allocation map of `[offset, offset + length)`, clipped to the disk.
    func allocationMap(offset: UInt64, length: UInt64) throws -> [AllocationExtent]
}

/// One extent of an allocation map: the same facts `qemu-img map --output=json` prints.
public struct AllocationExtent: Sendable, Equatable {
    public var start: UInt64
    public var length: UInt64
    /// Index of the layer that provides the range (0 = top image).
    public var depth: Int
    /// Allocated in some layer of the chain.
    public var present: Bool
    /// Reads as zeros.
    public var zero: Bool
    /// Backed by data (not a zero cluster or hole).
    public var data: Bool
    /// Host offset in `file`, when the range maps to one (not for compressed clusters).
    public var offset: UInt64?
    /// The data is stored compressed.
    public var compressed: Bool
    /// The file holding the data (the layer's image file or its external data file).
    public var file: String?

    public var end: UInt64 { start + length }

    public init(start: UInt64, length: UInt64, depth: Int, present: Bool, zero: Bool, data: Bool,
                offset: UInt64?, compressed: Bool, file: String?) {
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.compressed = compressed
        self.file = file
    }

    /// True when `next` continues this extent with the same properties (qemu-img map merges these).
    public func canMerge(with next: AllocationExtent) -> Bool {
        guard end == next.start, depth == next.depth, present == next.present, zero == next.zero,
              data == next.data, compressed == next.compressed, file == next.file
        else { return false }
        switch (offset, next.offset) {
        case (nil, nil): return true
        case let (a?, b?): return a + length == b
        default: return false
        }
    }
}
