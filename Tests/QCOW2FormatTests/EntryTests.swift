import QCOW2Format
import Testing

private let g64 = ClusterGeometry(clusterBits: 16, extendedL2: false)
private let g64ext = ClusterGeometry(clusterBits: 16, extendedL2: true)

@Suite("L1 and L2 entries")
struct L2EntryTests {
    @Test("L1 entry (§4.2, §15: 0x8000000000040000)")
    func l1Entry() {
        let e = L1Entry(rawValue: 0x8000_0000_0004_0000)
        #expect(e.l2Offset == 0x40000)
        #expect(e.isCopied)
        #expect(!e.hasReservedBits)
        #expect(L1Entry(l2Offset: 0x40000, copied: true) == e)
        #expect(L1Entry(rawValue: 0x0000_0000_0009_0000).isCopied == false)
        #expect(L1Entry(rawValue: 0x8100_0000_0004_0000).hasReservedBits)
        #expect(L1Entry(rawValue: 0x8000_0000_0004_0001).hasReservedBits)
        #expect(L1Entry(rawValue: 0x8100_0000_0004_0001).l2Offset == 0x40000)
    }

    /// §4.5: what QEMU writes, decoded in QEMU's order.
    static let standardCases: [(UInt64, ClusterKind)] = [
        (0x8000_0000_0005_0000, .normal(host: 0x50000)),
        (0x0000_0000_0000_0001, .zeroPlain),
        (0x8000_0000_0006_0001, .zeroAllocated(host: 0x60000)),
        (0x0000_0000_0000_0000, .unallocated),
        (0x0000_0000_0005_0000, .normal(host: 0x50000)),            // copied flag clear: still normal
        (0x8000_0000_0000_0000, .unallocated),                     // offset 0 without a data file
    ]

    @Test("cluster types of standard L2 entries (§4.5)", arguments: standardCases)
    func standardKinds(raw: UInt64, kind: ClusterKind) throws {
        #expect(try L2Entry(rawValue: raw).clusterKind(geometry: g64, version: 3, externalData: false) == kind)
    }

    @Test("offset masks keep the flags out of the host offset")
    func masks() {
        let e = L2Entry(rawValue: 0xC000_0000_0005_0001)
        #expect(e.isCompressed && e.isCopied && e.hasZeroFlag)
        #expect(L2Entry(rawValue: 0x8000_0000_0006_0001).hostOffset == 0x60000)
        #expect(L2Entry(rawValue: 0x8100_0000_0005_0000).hasReservedBits)
        #expect(L2Entry(rawValue: 0x8000_0000_0005_0002).hasReservedBits)
        #expect(!L2Entry(rawValue: 0x8000_0000_0005_0001).hasReservedBits)
    }

    @Test("zero flag in a version 2 image is corruption")
    func zeroFlagV2() throws {
        #expect(throws: FormatError.self) {
            _ = try L2Entry(rawValue: 0x1).clusterKind(geometry: g64, version: 2, externalData: false)
        }
        #expect(try L2Entry(rawValue: 0x8000_0000_0005_0000).clusterKind(geometry: g64, version: 2, externalData: false)
                == .normal(host: 0x50000))
    }

    @Test("unaligned data offset is corruption")
    func unaligned() throws {
        expectInvalidField("L2 entry host offset") {
            _ = try L2Entry(rawValue: 0x8000_0000_0005_0200).clusterKind(geometry: g64, version: 3, externalData: false)
        }
        // With 512-byte clusters the same offset is aligned.
        let g512 = ClusterGeometry(clusterBits: 9, extendedL2: false)
        #expect(try L2Entry(rawValue: 0x8000_0000_0005_0200).clusterKind(geometry: g512, version: 3, externalData: false)
                == .normal(host: 0x50200))
    }

    /// §10: with a data file, offset 0 + copied is the cluster at data-file offset 0.
    @Test("external data file: offset 0 with the copied flag is allocated (§10)")
    func externalData() throws {
        #expect(try L2Entry(rawValue: 0x8000_0000_0000_0000).clusterKind(geometry: g64, version: 3, externalData: true)
                == .normal(host: 0))
        #expect(try L2Entry(rawValue: 0).clusterKind(geometry: g64, version: 3, externalData: true) == .unallocated)
        #expect(try L2Entry(rawValue: 0x8000_0000_0000_0001).clusterKind(geometry: g64, version: 3, externalData: true)
                == .zeroPlain)  // the zero flag wins; QEMU: ZERO_PLAIN (offset 0)
        #expect(try L2Entry(rawValue: 0x8000_0000_0002_0001).clusterKind(geometry: g64, version: 3, externalData: true)
                == .zeroAllocated(host: 0x20000))
        #expect(throws: FormatError.self) {
            _ = try L2Entry(rawValue: 0x4000_0000_0005_0000).clusterKind(geometry: g64, version: 3, externalData: true)
        }
    }

    /// §6: the table of what QEMU writes with 64 KiB clusters (2 KiB subclusters).
    @Test("extended L2 entries written by QEMU (§6)")
    func extendedL2Table() throws {
        func types(_ raw: UInt64, _ bitmap: UInt64) throws -> (ClusterKind, [SubclusterType]) {
            let e = L2Entry(rawValue: raw, bitmap: bitmap)
            let kind = try e.clusterKind(geometry: g64ext, version: 3, externalData: false)
            return (kind, (0..<32).map { e.subclusterType($0, kind: kind) })
        }
        // write 4 KiB at cluster start
        var (k, t) = try types(0x8000_0000_0005_0000, 0x0000_0000_0000_0003)
        #expect(k == .normal(host: 0x50000))
        #expect(t[0] == .normal && t[1] == .normal)
        #expect(t[2...].allSatisfy { $0 == .unallocatedAllocated })
        // whole cluster
        (k, t) = try types(0x8000_0000_0006_0000, 0x0000_0000_FFFF_FFFF)
        #expect(t.allSatisfy { $0 == .normal })
        // write-zeroes 4 KiB on an unallocated cluster
        (k, t) = try types(0, 0x0000_0003_0000_0000)
        #expect(k == .unallocated)
        #expect(t[0] == .zeroPlain && t[1] == .zeroPlain)
        #expect(t[2...].allSatisfy { $0 == .unallocatedPlain })
        // write 4 KiB at +0, then write-zeroes 6 KiB at +2 KiB
        (k, t) = try types(0x8000_0000_0007_0000, 0x0000_000E_0000_0001)
        #expect(t[0] == .normal)
        #expect(t[1] == .zeroAllocated && t[2] == .zeroAllocated && t[3] == .zeroAllocated)
        #expect(t[4...].allSatisfy { $0 == .unallocatedAllocated })
        // compressed
        (k, t) = try types(0x4000_0000_0008_0000, 0)
        if case .compressed = k {} else { Issue.record("expected compressed, got \(k)") }
        #expect(t.allSatisfy { $0 == .compressed })
        // whole cluster written then discarded; write-zeroes on a whole unallocated cluster
        (k, t) = try types(0, 0xFFFF_FFFF_0000_0000)
        #expect(t.allSatisfy { $0 == .zeroPlain })
    }

    @Test("extended L2: the zero flag of the standard part is ignored")
    func extendedZeroFlagIgnored() throws {
        #expect(try L2Entry(rawValue: 0x1, bitmap: 0).clusterKind(geometry: g64ext, version: 3, externalData: false) == .unallocated)
        #expect(try L2Entry(rawValue: 0x8000_0000_0005_0001, bitmap: 1).clusterKind(geometry: g64ext, version: 3, externalData: false)
                == .normal(host: 0x50000))
    }

    @Test("extended L2: invalid bitmaps (§6)")
    func invalidBitmaps() throws {
        // alloc and zero on the same subcluster of an allocated cluster
        let both = L2Entry(rawValue: 0x8000_0000_0005_0000, bitmap: 0x0000_0001_0000_0001)
        let k1 = try both.clusterKind(geometry: g64ext, version: 3, externalData: false)
        #expect((0..<32).allSatisfy { both.subclusterType($0, kind: k1) == .invalid })
        // alloc bits without a host offset
        let orphan = L2Entry(rawValue: 0, bitmap: 0x0000_0000_0000_0004)
        let k2 = try orphan.clusterKind(geometry: g64ext, version: 3, externalData: false)
        #expect((0..<32).allSatisfy { orphan.subclusterType($0, kind: k2) == .invalid })
        // compressed with a non-zero bitmap
        #expect(throws: FormatError.self) {
            _ = try L2Entry(rawValue: 0x4000_0000_0008_0000, bitmap: 1).clusterKind(geometry: g64ext, version: 3, externalData: false)
        }
    }
}

@Suite("Compressed cluster descriptors")
struct CompressedDescriptorTests {
    /// §5.1 worked decodes.
    static let knownAnswers: [(UInt64, UInt32, UInt64, UInt64)] = [
        (0x5040_0000_0005_0000, 16, 0x50000, 33_792),
        (0x5040_0000_0005_829F, 16, 0x5829F, 33_633),
        (0x4000_0000_0000_0A00, 9, 0xA00, 512),
        (0x5048_0000_00A0_0000, 21, 0xA0_0000, 2085 * 512),
        (0x4000_0000_0005_0000, 16, 0x50000, 512),
        (0x4000_0000_0005_004F, 16, 0x5004F, 512 - 0x4F),
    ]

    @Test("known answers (§5.1)", arguments: knownAnswers)
    func decode(raw: UInt64, bits: UInt32, offset: UInt64, size: UInt64) throws {
        let d = try CompressedDescriptor(l2Entry: raw, clusterBits: bits)
        #expect(d.hostOffset == offset)
        #expect(d.compressedSize == size)
        let kind = try L2Entry(rawValue: raw).clusterKind(
            geometry: ClusterGeometry(clusterBits: bits, extendedL2: false), version: 3, externalData: false)
        #expect(kind == .compressed(d))
    }

    @Test("offset field width is 70 - cluster_bits", arguments: Array(UInt32(9)...UInt32(21)))
    func widths(bits: UInt32) throws {
        let x = UInt64(70 - bits)
        let countBits = UInt64(bits - 8)
        let maxCount = (UInt64(1) << countBits) - 1
        let offset: UInt64 = 0x12_3456 & ((1 << min(x, 56)) - 1)
        let raw = (1 << 62) | (maxCount << x) | offset
        let d = try CompressedDescriptor(l2Entry: raw, clusterBits: bits)
        #expect(d.hostOffset == offset)
        #expect(d.compressedSize == (maxCount + 1) * 512 - (offset & 511))
    }

    /// QEMU packs consecutive 79-byte streams with no gap (§5.1): 0x50000, 0x5004F, 0x5009E.
    @Test("encode: nsect_add = (coffset + len - 1) / 512 - coffset / 512")
    func encode() throws {
        #expect(CompressedDescriptor.encode(hostOffset: 0x50000, length: 79, clusterBits: 16) == 0x50000)
        #expect(CompressedDescriptor.encode(hostOffset: 0x5004F, length: 79, clusterBits: 16) == 0x5004F)
        #expect(CompressedDescriptor.encode(hostOffset: 0x501F0, length: 79, clusterBits: 16) == (1 << 54) | 0x501F0)
        // The §5.1 example: 33 633 bytes at 0x5829F → 65 additional sectors.
        let raw = CompressedDescriptor.encode(hostOffset: 0x5829F, length: 33_633, clusterBits: 16)
        #expect(raw | (1 << 62) == 0x5040_0000_0005_829F)
        for bits in UInt32(9)...21 {
            for (off, len) in [(UInt64(0x1000), UInt64(1)), (0x11FF, 2), (0x20001, 300), (0x7FFF_FFF1, 1 << (bits - 1))] {
                let e = CompressedDescriptor.encode(hostOffset: off, length: len, clusterBits: bits)
                let d = try CompressedDescriptor(l2Entry: e | (1 << 62), clusterBits: bits)
                #expect(d.hostOffset == off)
                #expect(d.compressedSize >= len, "\(bits) \(off) \(len)")
                #expect(d.compressedSize < len + 512, "\(bits) \(off) \(len)")
            }
        }
    }

    @Test("offsets beyond 2^56 are rejected (512-byte clusters)")
    func tooLarge() {
        // cluster_bits 9: x = 61, so offset bits 56…60 are representable but invalid.
        #expect(throws: FormatError.self) {
            _ = try CompressedDescriptor(l2Entry: (1 << 62) | (1 << 57), clusterBits: 9)
        }
    }
}

@Suite("Refcount blocks")
struct RefcountTests {
    /// §7.3: six clusters with refcount 1, as QEMU packs them.
    static let sixOnesCases: [(UInt32, [UInt8])] = [
        (0, [0x3F]),
        (1, [0x55, 0x05]),
        (2, [0x11, 0x11, 0x11]),
        (3, [1, 1, 1, 1, 1, 1]),
        (4, [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]),
        (5, [0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]),
        (6, (0..<6).flatMap { _ in [0, 0, 0, 0, 0, 0, 0, 1] as [UInt8] }),
    ]

    @Test("packing of six refcounts of 1 (§7.3)", arguments: sixOnesCases)
    func sixOnes(order: UInt32, expected: [UInt8]) {
        let codec = RefcountBlockCodec(order: order)
        var block = [UInt8](repeating: 0, count: 512)
        block.withUnsafeMutableBytes { for i in 0..<6 { codec.set($0, i, 1) } }
        #expect(Array(block.prefix(expected.count)) == expected)
        #expect(block.dropFirst(expected.count).allSatisfy { $0 == 0 })
        block.withUnsafeBytes { raw in
            #expect((0..<6).allSatisfy { codec.get(raw, $0) == 1 })
            #expect(codec.get(raw, 6) == 0)
        }
    }

    @Test("set/get round trip without disturbing neighbours", arguments: Array(UInt32(0)...UInt32(6)))
    func roundTrip(order: UInt32) {
        let codec = RefcountBlockCodec(order: order)
        #expect(codec.bits == 1 << Int(order))
        #expect(codec.entries(clusterSize: 65536) == 65536 * 8 / codec.bits)
        #expect(codec.maxValue == (codec.bits == 64 ? UInt64.max : (1 << UInt64(codec.bits)) - 1))
        let n = codec.entries(clusterSize: 512)
        var block = [UInt8](repeating: 0, count: 512)
        func value(_ i: Int) -> UInt64 {
            let v = UInt64(i + 1) &* 0x9E37_79B9_7F4A_7C15
            return v & codec.maxValue
        }
        block.withUnsafeMutableBytes { for i in 0..<n { codec.set($0, i, value(i)) } }
        block.withUnsafeBytes { raw in #expect((0..<n).allSatisfy { codec.get(raw, $0) == value($0) }) }
        // Overwrite one entry with max, then 0: neighbours unchanged.
        block.withUnsafeMutableBytes { codec.set($0, 7, codec.maxValue) }
        block.withUnsafeBytes { raw in
            #expect(codec.get(raw, 7) == codec.maxValue)
            #expect(codec.get(raw, 6) == value(6) && codec.get(raw, 8) == value(8))
        }
        block.withUnsafeMutableBytes { codec.set($0, 7, 0) }
        block.withUnsafeBytes { raw in
            #expect(codec.get(raw, 7) == 0)
            #expect(codec.get(raw, 6) == value(6) && codec.get(raw, 8) == value(8))
        }
    }

    @Test("refcount table entries (§7.1)")
    func tableEntry() {
        let e = RefcountTableEntry(rawValue: 0x0000_0000_0002_0000)
        #expect(e.blockOffset == 0x20000 && !e.hasReservedBits)
        #expect(RefcountTableEntry(rawValue: 0x0000_0000_0002_0001).hasReservedBits)
        // All 55 upper bits are offset bits (unlike L1/L2 entries).
        #expect(RefcountTableEntry(rawValue: 0xFF00_0000_0002_0000).blockOffset == 0xFF00_0000_0002_0000)
    }
}
