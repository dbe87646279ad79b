/// Quantities derived from `cluster_bits` and the L2 entry width (format doc §1.2).
public struct ClusterGeometry: Sendable, Hashable {
    public let clusterBits: UInt32
    public let extendedL2: Bool

    public init(clusterBits: UInt32, extendedL2: Bool) {
        self.clusterBits = clusterBits
        self.extendedL2 = extendedL2
    }

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var l2EntrySize: UInt64 { extendedL2 ? 16 : 8 }
    public var l2EntriesBits: UInt32 { clusterBits - (extendedL2 ? 4 : 3) }
    public var l2Entries: UInt64 { clusterSize / l2EntrySize }
    /// Guest bytes mapped by one L2 table.
    public var l2Coverage: UInt64 { l2Entries << UInt64(clusterBits) }
    public var subclusterSize: UInt64 { extendedL2 ? clusterSize / 32 : clusterSize }

    /// `ceil(size / l2Coverage)`, or nil on overflow. QEMU's `size_to_l1()`.
    public func l1EntriesNeeded(forVirtualSize size: UInt64) -> UInt64? {
        let shift = UInt64(clusterBits + l2EntriesBits)
        let (sum, overflow) = size.addingReportingOverflow(l2Coverage - 1)
        guard !overflow else { return nil }
        return sum >> shift
    }

    @inline(__always) public func l1Index(_ guest: UInt64) -> UInt64 { guest >> UInt64(clusterBits + l2EntriesBits) }
    @inline(__always) public func l2Index(_ guest: UInt64) -> UInt64 { (guest >> UInt64(clusterBits)) & (l2Entries - 1) }
    @inline(__always) public func offsetInCluster(_ value: UInt64) -> UInt64 { value & (clusterSize - 1) }
}
