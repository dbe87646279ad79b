import QCOW2Format
import Testing

@Suite("QCOW2Header")
struct HeaderTests {
    /// §15: `qemu-img create -f qcow2 x.qcow2 1G`.
    @Test("parses the §15 worked example (1 GiB default image)")
    func workedExample() throws {
        let h = try QCOW2Header.parse(worked1GCluster0())
        #expect(h.version == 3)
        #expect(h.backingFileOffset == 0)
        #expect(h.backingFileSize == 0)
        #expect(h.clusterBits == 16)
        #expect(h.clusterSize == 65536)
        #expect(h.size == 1 << 30)
        #expect(h.cryptMethodRaw == 0)
        #expect(h.cryptMethod == CryptMethod.none)
        #expect(h.l1Size == 2)
        #expect(h.l1TableOffset == 0x30000)
        #expect(h.refcountTableOffset == 0x10000)
        #expect(h.refcountTableClusters == 1)
        #expect(h.nbSnapshots == 0)
        #expect(h.snapshotsOffset == 0)
        #expect(h.incompatibleFeatures == [])
        #expect(h.compatibleFeatures == [])
        #expect(h.autoclearFeatures == [])
        #expect(h.refcountOrder == 4)
        #expect(h.refcountBits == 16)
        #expect(h.headerLength == 112)
        #expect(h.compressionType == .deflate)
        #expect(h.unknownTrailingFields.isEmpty)
        #expect(!h.hasExtendedL2)
        #expect(!h.hasExternalDataFile)
    }

    @Test("serializing QEMU's defaults reproduces the §15 header bytes")
    func serializeWorkedExample() {
        var h = QCOW2Header(size: 1 << 30)
        h.l1Size = 2
        h.l1TableOffset = 0x30000
        h.refcountTableOffset = 0x10000
        h.refcountTableClusters = 1
        #expect(h.serialize() == worked1GHeader)
    }

    @Test("round trip: parse(serialize(h)) == h")
    func roundTrip() throws {
        var h = QCOW2Header(clusterBits: 12, size: 3 * 1048576 + 512)
        h.l1Size = 2
        h.l1TableOffset = 0x3000
        h.refcountTableOffset = 0x1000
        h.refcountTableClusters = 1
        h.incompatibleFeatures = [.compressionType, .dirty]
        h.compressionType = .zstd
        h.compatibleFeatures = [.lazyRefcounts]
        h.refcountOrder = 6
        let bytes = h.serialize()
        #expect(bytes.count == 112)
        #expect(bytes[104] == 1)
        #expect(try QCOW2Header.parse(bytes.padded(to: 4096)) == h)
    }

    @Test("unknown trailing header fields are kept verbatim")
    func trailingFields() throws {
        var b = worked1GHeader + [UInt8](repeating: 0xAB, count: 8)
        b.put32(120, at: 100)
        let h = try QCOW2Header.parse(b.padded(to: 65536))
        #expect(h.headerLength == 120)
        #expect(h.unknownTrailingFields == [UInt8](repeating: 0xAB, count: 8))
        #expect(Array(h.serialize()) == b)
    }

    @Test("header_length 104: no compression type byte, deflate")
    func headerLength104() throws {
        var b = worked1GHeader
        b.put32(104, at: 100)
        b[104] = 1  // beyond header_length: must be ignored
        let h = try QCOW2Header.parse(b.padded(to: 65536))
        #expect(h.headerLength == 104)
        #expect(h.compressionType == .deflate)
    }

    @Test("version 2 header (72 bytes, implicit v3 fields)")
    func version2() throws {
        var b = Array(worked1GHeader[0..<72])
        b.put32(2, at: 4)
        b.put32(1, at: 36)  // 100 MiB @ 64k → l1_size 1
        b.put64(100 << 20, at: 24)
        // v3 fields must not be read: put junk where they would be.
        let h = try QCOW2Header.parse(b + [UInt8](repeating: 0xFF, count: 40))
        #expect(h.version == 2)
        #expect(h.headerLength == 72)
        #expect(h.refcountOrder == 4)
        #expect(h.incompatibleFeatures == [])
        #expect(h.compressionType == .deflate)
        #expect(h.serialize() == b)
    }

    // MARK: Open-time validation (§2.4), one mutation of the worked example at a time.

    func mutated(_ change: (inout [UInt8]) -> Void) -> [UInt8] {
        var b = worked1GCluster0()
        change(&b)
        return b
    }

    @Test("bad magic")
    func badMagic() {
        let b = mutated { $0.put32(0x1234_5678, at: 0) }
        #expect(throws: FormatError.badMagic(0x1234_5678)) { _ = try QCOW2Header.parse(b) }
    }

    @Test("truncated header", arguments: [0, 3, 4, 50, 71, 100])
    func truncated(length: Int) {
        let b = Array(worked1GCluster0()[0..<length])
        let e = formatError { _ = try QCOW2Header.parse(b) }
        if let e {
            switch e {
            case .truncated, .badMagic: break  // fewer than 4 bytes cannot even hold the magic
            default: Issue.record("expected truncated, got \(e)")
            }
        }
    }

    @Test("versions other than 2 and 3", arguments: [0 as UInt32, 1, 4, 0xFFFF_FFFF])
    func badVersion(_ v: UInt32) {
        expectInvalidField("version") { _ = try QCOW2Header.parse(mutated { $0.put32(v, at: 4) }) }
    }

    @Test("cluster_bits outside 9…21", arguments: [0 as UInt32, 8, 22, 63, 0xFFFF_FFFF])
    func badClusterBits(_ bits: UInt32) {
        expectInvalidField("cluster_bits") { _ = try QCOW2Header.parse(mutated { $0.put32(bits, at: 20) }) }
    }

    @Test("cluster_bits 9…21 accepted", arguments: Array(UInt32(9)...UInt32(21)))
    func goodClusterBits(_ bits: UInt32) throws {
        // Keep the tables aligned and the L1 big enough for every cluster size.
        let b = mutated {
            $0.put32(bits, at: 20)
            $0.put64(1 << 20, at: 24)
            $0.put32(64, at: 36)
            $0.put64(UInt64(3) << UInt64(bits), at: 40)
            $0.put64(UInt64(1) << UInt64(bits), at: 48)
            // No feature table in small clusters: end the extension list right away.
            for i in 112..<0x200 { $0[i] = 0 }
        }
        let h = try QCOW2Header.parse(b)
        #expect(h.clusterSize == 1 << Int(bits))
    }

    @Test("header_length below 104 or above the cluster size", arguments: [0 as UInt32, 72, 96, 100, 0x10008, 0x20000])
    func badHeaderLength(_ len: UInt32) {
        expectInvalidField("header_length") { _ = try QCOW2Header.parse(mutated { $0.put32(len, at: 100) }) }
    }

    @Test("l1_size smaller than the virtual size needs")
    func l1TooSmall() {
        expectInvalidField("l1_size") { _ = try QCOW2Header.parse(mutated { $0.put32(1, at: 36) }) }
        expectInvalidField("l1_size") { _ = try QCOW2Header.parse(mutated { $0.put32(0, at: 36) }) }
    }

    @Test("l1_size above 32 MiB of entries")
    func l1TooLarge() {
        expectInvalidField("l1_size") { _ = try QCOW2Header.parse(mutated { $0.put32(0x7FFF_FFFF, at: 36) }) }
        expectInvalidField("l1_size") { _ = try QCOW2Header.parse(mutated { $0.put32(4 * 1024 * 1024 + 1, at: 36) }) }
    }

    @Test("l1_size larger than needed is fine (after a shrink)")
    func l1Larger() throws {
        let h = try QCOW2Header.parse(mutated { $0.put32(4 * 1024 * 1024, at: 36) })
        #expect(h.l1Size == 4 * 1024 * 1024)
    }

    @Test("l1_table_offset not cluster aligned or beyond 2^56")
    func l1Offset() {
        expectInvalidField("l1_table_offset") { _ = try QCOW2Header.parse(mutated { $0.put64(0x30200, at: 40) }) }
        expectInvalidField("l1_table_offset") { _ = try QCOW2Header.parse(mutated { $0.put64(1 << 60, at: 40) }) }
    }

    @Test("virtual size too large for the cluster size")
    func sizeTooLarge() {
        // 3 PiB at 64k needs more than 4 Mi L1 entries; 2^63 overflows.
        let e1 = formatError { _ = try QCOW2Header.parse(mutated { $0.put64(3 << 50, at: 24); $0.put32(0x7FFF_FFFF, at: 36) }) }
        #expect(e1 != nil)
        let e2 = formatError { _ = try QCOW2Header.parse(mutated { $0.put64(UInt64.max, at: 24) }) }
        #expect(e2 != nil)
    }

    @Test("refcount table: too many clusters, unaligned offset")
    func refcountTable() {
        expectInvalidField("refcount_table_clusters") { _ = try QCOW2Header.parse(mutated { $0.put32(0x7FFF_FFFF, at: 56) }) }
        expectInvalidField("refcount_table_clusters") { _ = try QCOW2Header.parse(mutated { $0.put32(129, at: 56) }) }  // 129 × 64k > 8 MiB
        expectInvalidField("refcount_table_offset") { _ = try QCOW2Header.parse(mutated { $0.put64(0x10200, at: 48) }) }
    }

    @Test("refcount table of exactly 8 MiB is accepted")
    func refcountTableLimit() throws {
        let h = try QCOW2Header.parse(mutated { $0.put32(128, at: 56) })
        #expect(h.refcountTableClusters == 128)
    }

    @Test("snapshots: more than 65536, unaligned table")
    func snapshots() throws {
        expectInvalidField("nb_snapshots") { _ = try QCOW2Header.parse(mutated { $0.put32(65537, at: 60) }) }
        expectInvalidField("snapshots_offset") {
            _ = try QCOW2Header.parse(mutated { $0.put32(1, at: 60); $0.put64(0x10200, at: 64) })
        }
        let h = try QCOW2Header.parse(mutated { $0.put32(65536, at: 60); $0.put64(0x50000, at: 64) })
        #expect(h.nbSnapshots == 65536)
    }

    @Test("backing_file_offset beyond the first cluster")
    func backingOffset() {
        expectInvalidField("backing_file_offset") {
            _ = try QCOW2Header.parse(mutated { $0.put64(65537, at: 8); $0.put32(4, at: 16) })
        }
    }

    @Test("backing_file_size over 1023 or past cluster 0")
    func backingSize() {
        expectInvalidField("backing_file_size") {
            _ = try QCOW2Header.parse(mutated { $0.put64(0x200, at: 8); $0.put32(1024, at: 16) })
        }
        expectInvalidField("backing_file_size") {
            _ = try QCOW2Header.parse(mutated { $0.put64(65536 - 10, at: 8); $0.put32(11, at: 16) })
        }
    }

    @Test("compression type and incompatible bit 3 must agree")
    func compressionType() throws {
        #expect(formatError { _ = try QCOW2Header.parse(mutated { $0.put64(1 << 3, at: 72) }) } != nil)
        #expect(formatError { _ = try QCOW2Header.parse(mutated { $0[104] = 1 }) } != nil)
        expectInvalidField("compression_type") {
            _ = try QCOW2Header.parse(mutated { $0[104] = 2; $0.put64(1 << 3, at: 72) })
        }
        let h = try QCOW2Header.parse(mutated { $0[104] = 1; $0.put64(1 << 3, at: 72) })
        #expect(h.compressionType == .zstd)
        #expect(h.compressionType.description == "zstd")
        #expect(CompressionType.deflate.description == "zlib")
    }

    @Test("refcount_order above 6")
    func refcountOrder() throws {
        expectInvalidField("refcount_order") { _ = try QCOW2Header.parse(mutated { $0.put32(7, at: 96) }) }
        for order in UInt32(0)...6 {
            let h = try QCOW2Header.parse(mutated { $0.put32(order, at: 96) })
            #expect(h.refcountBits == 1 << Int(order))
        }
    }

    @Test("extended L2 needs clusters of at least 16 KiB")
    func extendedL2ClusterSize() throws {
        let small = mutated {
            $0.put64(1 << 4, at: 72)
            $0.put32(13, at: 20)
            $0.put64(1 << 20, at: 24)
            $0.put64(3 << 13, at: 40)
            $0.put64(1 << 13, at: 48)
        }
        expectInvalidField("cluster_bits") { _ = try QCOW2Header.parse(small) }
        let h = try QCOW2Header.parse(mutated { $0.put64(1 << 4, at: 72); $0.put32(4, at: 36) })
        #expect(h.hasExtendedL2)
    }

    @Test("extended L2 doubles the L1 size needed (1 GiB @ 64k → 4 entries)")
    func extendedL2L1Size() {
        expectInvalidField("l1_size") { _ = try QCOW2Header.parse(mutated { $0.put64(1 << 4, at: 72) }) }  // l1_size 2 < 4
    }

    @Test("crypt_method above 2")
    func cryptMethod() throws {
        expectInvalidField("crypt_method") { _ = try QCOW2Header.parse(mutated { $0.put32(3, at: 32) }) }
        #expect(try QCOW2Header.parse(mutated { $0.put32(1, at: 32) }).cryptMethod == .aes)
        #expect(try QCOW2Header.parse(mutated { $0.put32(2, at: 32) }).cryptMethod == .luks)
    }

    @Test("unknown incompatible bits are named from the feature table, or as QEMU does")
    func unknownIncompatibleNames() throws {
        let h = try QCOW2Header.parse(mutated { $0.put64(1 << 6 | 1 << 40, at: 72) })
        #expect(h.unknownIncompatibleFeatureNames([]) == [
            "Unknown incompatible feature: 40", "Unknown incompatible feature: 10000000000",
        ])
        let named = [FeatureNameEntry(type: .incompatible, bit: 6, name: "frobnicate")]
        #expect(h.unknownIncompatibleFeatureNames(named) == ["frobnicate", "Unknown incompatible feature: 10000000000"])
        let known = try QCOW2Header.parse(mutated { $0.put64(0x1 | 0x2, at: 72) })
        #expect(known.unknownIncompatibleFeatureNames([]) == [])
    }
}

@Suite("ClusterGeometry")
struct ClusterGeometryTests {
    /// §1.2: values checked with qemu-img.
    static let l1Cases: [(UInt32, Bool, UInt64, UInt64)] = [
        (16, false, 100 << 20, 1),
        (16, false, 1 << 30, 2),
        (16, true, 1 << 30, 4),
        (21, false, 1 << 40, 2),
        (21, true, 1 << 40, 4),
        (9, false, 1 << 20, 32),
        (16, false, 2 << 50, 4_194_304),
        (16, false, 0, 0),
        (16, false, 1, 1),
    ]

    @Test("l1 entries needed", arguments: l1Cases)
    func l1Entries(bits: UInt32, ext: Bool, size: UInt64, expected: UInt64) {
        #expect(ClusterGeometry(clusterBits: bits, extendedL2: ext).l1EntriesNeeded(forVirtualSize: size) == expected)
    }

    @Test("overflow gives nil")
    func overflow() {
        #expect(ClusterGeometry(clusterBits: 16, extendedL2: false).l1EntriesNeeded(forVirtualSize: .max) == nil)
    }

    /// §1.2 table: L2 entries and guest bytes per L2 table.
    static let derivedCases: [(UInt32, Bool, UInt64, UInt64)] = [
        (9, false, 64, 32 << 10),
        (12, false, 512, 2 << 20),
        (14, true, 1024, 16 << 20),
        (16, false, 8192, 512 << 20),
        (16, true, 4096, 256 << 20),
        (21, false, 262_144, 512 << 30),
        (21, true, 131_072, 256 << 30),
    ]

    @Test("derived quantities", arguments: derivedCases)
    func derived(bits: UInt32, ext: Bool, entries: UInt64, coverage: UInt64) {
        let g = ClusterGeometry(clusterBits: bits, extendedL2: ext)
        #expect(g.l2Entries == entries)
        #expect(g.l2Coverage == coverage)
        #expect(g.l2EntrySize == (ext ? 16 : 8))
        #expect(g.subclusterSize == (ext ? g.clusterSize / 32 : g.clusterSize))
    }

    @Test("lookup indices (§4.1)")
    func indices() {
        let g = ClusterGeometry(clusterBits: 16, extendedL2: false)
        let guest: UInt64 = (3 << 29) + (5 << 16) + 1234
        #expect(g.l1Index(guest) == 3)
        #expect(g.l2Index(guest) == 5)
        #expect(g.offsetInCluster(guest) == 1234)
        let e = ClusterGeometry(clusterBits: 16, extendedL2: true)
        #expect(e.l1Index(guest) == 6)
        #expect(e.l2Index(guest) == 5)
    }
}
