import QCOW2Format

/// The in-memory refcount table a check builds from the metadata: one counter per host
/// cluster, packed in the image's own refcount width so that any cluster-sized slice of it
/// is a valid refcount block (the rebuild writes those slices as they are).
///
/// It starts with one counter per cluster of the file. Counting refuses references that end
/// one cluster or more past the end of the file, so counting grows it by at most one cluster;
/// only the allocations of a rebuild (new refcount blocks and table) grow it further.
struct ReferenceTable {
    let codec: RefcountBlockCodec
    let clusterSize: Int
    /// Number of clusters covered.
    private(set) var count: UInt64 = 0
    /// Packed counters; the byte size is always a whole number of clusters.
    private(set) var bytes: [UInt8] = []

    init(order: UInt32, clusterSize: Int, clusters: UInt64) {
        codec = RefcountBlockCodec(order: order)
        self.clusterSize = clusterSize
        resize(to: clusters)
    }

    var maxValue: UInt64 { codec.maxValue }
    /// Counters per cluster-sized slice (= per refcount block).
    var entriesPerBlock: UInt64 { UInt64(codec.entries(clusterSize: clusterSize)) }

    /// Grows (never shrinks) to cover `clusters` clusters; new counters are 0.
    mutating func resize(to clusters: UInt64) {
        let blocks = (clusters + entriesPerBlock - 1) / entriesPerBlock
        let needed = Int(blocks) * clusterSize
        if needed > bytes.count { bytes.append(contentsOf: repeatElement(0, count: needed - bytes.count)) }
        count = max(count, clusters)
    }

    /// Sets every counter to 0, keeping the size.
    mutating func clear() {
        bytes.withUnsafeMutableBytes { $0.initializeMemory(as: UInt8.self, repeating: 0) }
    }

    subscript(_ cluster: UInt64) -> UInt64 {
        get {
            guard cluster < count else { return 0 }
            return bytes.withUnsafeBytes { codec.get($0, Int(cluster)) }
        }
        set {
            if cluster >= count { resize(to: cluster + 1) }
            bytes.withUnsafeMutableBytes { codec.set($0, Int(cluster), newValue) }
        }
    }

    /// The slice that is refcount block `index` (counters for clusters
    /// `index * entriesPerBlock ..< (index + 1) * entriesPerBlock`).
    func block(_ index: UInt64) -> ArraySlice<UInt8> {
        let start = Int(index) * clusterSize
        guard start < bytes.count else { return ArraySlice(repeatElement(0, count: clusterSize)) }
        return bytes[start..<(start + clusterSize)]
    }
}
