/// The limits QEMU enforces on qcow2 images (`block/qcow2.h`). Every size and count
/// read from an image is checked against these before anything is allocated or read.
public enum QCOW2Limits {
    public static let minClusterBits: UInt32 = 9
    public static let maxClusterBits: UInt32 = 21
    /// Extended L2 needs 32 subclusters of at least 512 bytes.
    public static let minClusterBitsExtendedL2: UInt32 = 14
    /// `QCOW_MAX_L1_SIZE` (32 MiB) in entries.
    public static let maxL1Entries: UInt64 = 32 * 1024 * 1024 / 8
    /// `QCOW_MAX_REFTABLE_SIZE`.
    public static let maxRefcountTableBytes: UInt64 = 8 * 1024 * 1024
    public static let maxSnapshots: UInt32 = 65_536
    public static let maxSnapshotTableBytes: UInt64 = 64 * 1024 * 1024
    public static let maxSnapshotExtraData: UInt32 = 1024
    /// Host offsets in L1/L2 entries are below 2^56.
    public static let maxHostOffset: UInt64 = (1 << 56) - 1
    public static let maxBackingFileNameLength: UInt32 = 1023
    public static let maxBackingFormatLength: Int = 15
    public static let maxRefcountOrder: UInt32 = 6
    public static let subclustersPerCluster = 32
    public static let defaultClusterBits: UInt32 = 16
}
