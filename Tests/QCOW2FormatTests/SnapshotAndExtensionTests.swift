import QCOW2Format
import Testing

@Suite("Snapshot table")
struct SnapshotTableTests {
    /// §8.2: raw bytes of the first entry as QEMU wrote them (70 bytes, then 2 bytes of padding).
    static let entry1 = hex("""
        0000000000070000 00000001 0001 0005 6B0995A4 191F6D50 0000000000000000 00000000 00000018
        0000000000000000 0000000006400000 0000000000000000 | 31 | 736E617031
        """)
    /// A second entry laid out the same way: id "2", name "mysnapshot_two" (79 bytes).
    static let entry2 = hex("""
        0000000000080000 00000001 0001 000E 6B0995B0 12345678 0000000000000000 00000000 00000018
        0000000000000000 0000000006400000 0000000000000000
        """) + Array("2mysnapshot_two".utf8)
    static let table = entry1 + [0, 0] + entry2

    @Test("the §8.2 table: 8-byte aligned entries, last one unpadded, ends at 0x97")
    func knownTable() throws {
        #expect(Self.entry1.count == 70)
        #expect(Self.entry2.count == 79)
        #expect(Self.table.count == 0x97)
        let entries = try SnapshotTableEntry.parseTable(Self.table, count: 2, clusterSize: 65536)
        #expect(entries.count == 2)
        let s1 = entries[0]
        #expect(s1.l1TableOffset == 0x70000)
        #expect(s1.l1Size == 1)
        #expect(s1.id == "1")
        #expect(s1.name == "snap1")
        #expect(s1.dateSeconds == 0x6B09_95A4)
        #expect(s1.dateNanoseconds == 0x191F_6D50)
        #expect(s1.vmClockNanoseconds == 0)
        #expect(s1.vmStateSize == 0)
        #expect(s1.diskSize == 100 << 20)
        #expect(s1.icount == 0)
        #expect(s1.unknownExtraData.isEmpty)
        #expect(entries[1].id == "2")
        #expect(entries[1].name == "mysnapshot_two")
        #expect(entries[1].l1TableOffset == 0x80000)

        #expect(SnapshotTableEntry.serializeTable(entries) == Self.table)
        #expect(SnapshotTableEntry.tableSize(entries) == 0x97)
        #expect(s1.serialize() == Self.entry1)
    }

    @Test("extra data: 64-bit VM state size wins; short extra data leaves fields absent")
    func extraData() throws {
        // extra_data_size 8: only vm_state_size_large.
        var e = hex("0000000000070000 00000001 0001 0001 00000000 00000000 0000000000000000 00000007 00000008")
        e += be64(0x1_0000_0000) + Array("1a".utf8)
        let s = try #require(try SnapshotTableEntry.parseTable(e, count: 1, clusterSize: 65536).first)
        #expect(s.vmStateSize == 0x1_0000_0000)
        #expect(s.diskSize == nil)
        #expect(s.icount == nil)
        // No extra data at all (v2 style): the 32-bit field is used.
        let v2 = hex("0000000000070000 00000001 0001 0001 00000000 00000000 0000000000000000 00000007 00000000") + Array("1a".utf8)
        let t = try #require(try SnapshotTableEntry.parseTable(v2, count: 1, clusterSize: 65536).first)
        #expect(t.vmStateSize == 7)
        #expect(t.diskSize == nil)
    }

    @Test("unknown extra data is kept and written back")
    func unknownExtra() throws {
        var e = hex("0000000000070000 00000001 0001 0001 00000000 00000000 0000000000000000 00000000 00000020")
        e += be64(0) + be64(1 << 20) + be64(.max) + [1, 2, 3, 4, 5, 6, 7, 8] + Array("1a".utf8)
        let s = try #require(try SnapshotTableEntry.parseTable(e, count: 1, clusterSize: 65536).first)
        #expect(s.unknownExtraData == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(s.icount == .max)
        #expect(s.serialize() == e)
    }

    @Test("invalid entries")
    func invalid() {
        var big = Self.entry1
        big.put32(1025, at: 36)
        #expect(throws: FormatError.self) { _ = try SnapshotTableEntry.parseTable(big + [UInt8](repeating: 0, count: 1100), count: 1, clusterSize: 65536) }
        var unaligned = Self.entry1
        unaligned.put64(0x70200, at: 0)
        #expect(throws: FormatError.self) { _ = try SnapshotTableEntry.parseTable(unaligned, count: 1, clusterSize: 65536) }
        var hugeL1 = Self.entry1
        hugeL1.put32(0x7FFF_FFFF, at: 8)
        #expect(throws: FormatError.self) { _ = try SnapshotTableEntry.parseTable(hugeL1, count: 1, clusterSize: 65536) }
        // More entries claimed than present, or a name running past the end.
        #expect(throws: FormatError.self) { _ = try SnapshotTableEntry.parseTable(Self.table, count: 3, clusterSize: 65536) }
        #expect(throws: FormatError.self) { _ = try SnapshotTableEntry.parseTable(Array(Self.entry1.dropLast()), count: 1, clusterSize: 65536) }
        #expect(throws: FormatError.self) { _ = try SnapshotTableEntry.parseTable([], count: 1, clusterSize: 65536) }
    }

    @Test("zero entries parse from nothing")
    func empty() throws {
        #expect(try SnapshotTableEntry.parseTable([], count: 0, clusterSize: 65536).isEmpty)
        #expect(SnapshotTableEntry.tableSize([]) == 0)
    }

    /// QEMU keeps id and name as byte strings: bytes that are not UTF-8 are kept as they
    /// are, lookups compare bytes (a decoded U+FFFD copy does not match), and a NUL ends the
    /// string for lookups and display (QEMU's strcmp/printf) but is still rewritten.
    @Test("id and name are raw bytes; lookups compare bytes up to a NUL")
    func rawNameBytes() throws {
        var e = Array(Self.entry1.prefix(64))
        e.replaceSubrange(12..<16, with: [0, 2, 0, 5])
        let id: [UInt8] = [0x37, 0xC3], name: [UInt8] = [0x61, 0xFF, 0x62, 0x00, 0x63]
        e += id + name
        let s = try #require(try SnapshotTableEntry.parseTable(e, count: 1, clusterSize: 65536).first)
        #expect(s.idBytes == id && s.nameBytes == name)
        #expect(SnapshotTableEntry.serializeTable([s]) == e)
        #expect(s.name == "a\u{FFFD}b" && s.id == "7\u{FFFD}")
        #expect(!s.hasName(s.name) && !s.hasID(s.id))
        #expect(!s.hasName("a") && !s.hasName("a\u{FF}b"))  // U+00FF is C3 BF in UTF-8
        let plain = SnapshotTableEntry(l1TableOffset: 0, l1Size: 0, id: "1", name: "ünï", dateSeconds: 0, dateNanoseconds: 0,
                                       vmClockNanoseconds: 0, vmStateSize: 0, diskSize: nil, icount: nil)
        #expect(plain.hasName("ünï") && plain.hasID("1") && !plain.hasID("01"))
        #expect(plain.nameBytes == Array("ünï".utf8))
    }
}

@Suite("Header extensions and cluster 0")
struct HeaderExtensionTests {
    @Test("the §15 feature name table")
    func featureTable() throws {
        let c0 = worked1GCluster0()
        let list = try HeaderExtension.parseList(c0, start: 112, end: 65536)
        #expect(list == [.featureNameTable(FeatureNameEntry.qemuDefault)])
        #expect(HeaderExtension.serializeList(list) == Array(c0[112..<0x200]))
        let image = try ImageHeader.parse(c0)
        #expect(image.featureNameTable == FeatureNameEntry.qemuDefault)
        #expect(image.backingFileName == nil)
        #expect(image.backingFormat == nil)
        #expect(image.externalDataFile == nil)
        #expect(image.serializeCluster0() == Array(c0[0..<0x200]))
    }

    /// §3.4: backing format → data file → FDE → feature table, then the backing name.
    @Test("QEMU's extension order and offsets (§3.4 example)")
    func qemuOrder() throws {
        var h = QCOW2Header(size: 1 << 30)
        h.l1Size = 2
        h.l1TableOffset = 0x240000
        h.refcountTableOffset = 0x10000
        h.refcountTableClusters = 1
        h.cryptMethodRaw = 2
        h.incompatibleFeatures = [.externalDataFile]
        // Deliberately out of order: serializeCluster0 must write QEMU's order.
        let image = ImageHeader(header: h, extensions: [
            .featureNameTable(FeatureNameEntry.qemuDefault),
            .fullDiskEncryption(offset: 0x40000, length: 0x1F9000),
            .externalDataFile("m.raw"),
            .backingFormat("raw"),
        ], backingFileName: "base.raw")
        let c0 = try #require(image.serializeCluster0())
        func u32(_ o: Int) -> UInt32 { c0[o..<(o + 4)].reduce(0) { $0 << 8 | UInt32($1) } }
        #expect(u32(0x70) == HeaderExtension.backingFormatType && u32(0x74) == 3)
        #expect(u32(0x80) == HeaderExtension.externalDataFileType && u32(0x84) == 5)
        #expect(u32(0x90) == HeaderExtension.fullDiskEncryptionType && u32(0x94) == 16)
        #expect(u32(0xA8) == HeaderExtension.featureNameTableType && u32(0xAC) == 384)
        #expect(c0[0x230..<0x238].allSatisfy { $0 == 0 })
        #expect(Array(c0[0x238..<0x240]) == Array("base.raw".utf8))
        #expect(c0.count == 0x240)

        let parsed = try ImageHeader.parse(c0.padded(to: 65536))
        #expect(parsed.header.backingFileOffset == 0x238)
        #expect(parsed.header.backingFileSize == 8)
        #expect(parsed.backingFileName == "base.raw")
        #expect(parsed.backingFormat == "raw")
        #expect(parsed.externalDataFile == "m.raw")
        #expect(parsed.fullDiskEncryption?.offset == 0x40000)
        #expect(parsed.fullDiskEncryption?.length == 0x1F9000)
        #expect(parsed.featureNameTable == FeatureNameEntry.qemuDefault)
        #expect(parsed.serializeCluster0() == c0)
    }

    @Test("unknown extensions are kept verbatim; padding is skipped")
    func unknownExtension() throws {
        var area = be32(0x1234_5678) + be32(5) + [1, 2, 3, 4, 5, 0xEE, 0xEE, 0xEE]  // non-zero padding
        area += be32(HeaderExtension.backingFormatType) + be32(5) + Array("qcow2".utf8) + [0, 0, 0]
        area += [UInt8](repeating: 0, count: 8)
        let list = try HeaderExtension.parseList(area.padded(to: 4096), start: 0, end: 4096)
        #expect(list == [.unknown(type: 0x1234_5678, data: [1, 2, 3, 4, 5]), .backingFormat("qcow2")])
    }

    @Test("an extension crossing the end of the area is rejected")
    func tooLarge() {
        let c0 = worked1GCluster0()
        var bad = c0
        bad.put32(0xFFFF, at: 0x74)
        #expect(throws: FormatError.self) { _ = try HeaderExtension.parseList(bad, start: 112, end: 65536) }
        #expect(throws: FormatError.self) { _ = try ImageHeader.parse(bad) }
        // The end marker itself must fit: an area that ends before it is malformed.
        #expect(throws: FormatError.self) { _ = try HeaderExtension.parseList(c0, start: 112, end: 0x1FC) }
    }

    @Test("fixed-length extensions with a wrong length are rejected")
    func fixedLengths() {
        let fde = be32(HeaderExtension.fullDiskEncryptionType) + be32(8) + [UInt8](repeating: 0, count: 8) + [UInt8](repeating: 0, count: 8)
        #expect(throws: FormatError.self) { _ = try HeaderExtension.parseList(fde.padded(to: 512), start: 0, end: 512) }
        let bitmaps = be32(HeaderExtension.bitmapsType) + be32(16) + [UInt8](repeating: 0, count: 16) + [UInt8](repeating: 0, count: 8)
        #expect(throws: FormatError.self) { _ = try HeaderExtension.parseList(bitmaps.padded(to: 512), start: 0, end: 512) }
        let fmt = be32(HeaderExtension.backingFormatType) + be32(16) + Array("qcow2qcow2qcow2q".utf8) + [UInt8](repeating: 0, count: 8)
        #expect(throws: FormatError.self) { _ = try HeaderExtension.parseList(fmt.padded(to: 512), start: 0, end: 512) }
    }

    @Test("bitmaps extension (24 bytes)")
    func bitmaps() throws {
        let data = be32(3) + be32(0) + be64(0x1000) + be64(0x50000)
        let area = be32(HeaderExtension.bitmapsType) + be32(24) + data + [UInt8](repeating: 0, count: 8)
        let list = try HeaderExtension.parseList(area.padded(to: 512), start: 0, end: 512)
        guard case let .bitmaps(b)? = list.first else {
            Issue.record("expected a bitmaps extension, got \(list)")
            return
        }
        #expect(b.count == 3 && b.directorySize == 0x1000 && b.directoryOffset == 0x50000)
        var reserved = area
        reserved.put32(1, at: 12)
        #expect(throws: FormatError.self) { _ = try HeaderExtension.parseList(reserved.padded(to: 512), start: 0, end: 512) }
    }

    @Test("cluster-0 validation: unknown incompatible bits, FDE without LUKS, data-file-raw rules")
    func cluster0Validation() {
        var unknown = worked1GCluster0()
        unknown.put64(1 << 6, at: 72)
        #expect(throws: FormatError.unsupportedIncompatibleFeatures(["Unknown incompatible feature: 40"])) {
            _ = try ImageHeader.parse(unknown)
        }
        // Named by the feature table: entry 4 renamed to bit 6.
        var named = unknown
        named.replaceSubrange((0x78 + 48 * 4)..<(0x78 + 48 * 5), with: featureEntry(0, 6, "frobnicate"))
        #expect(throws: FormatError.unsupportedIncompatibleFeatures(["frobnicate"])) { _ = try ImageHeader.parse(named) }

        var rawWithoutFile = worked1GCluster0()
        rawWithoutFile.put64(1 << 1, at: 88)
        #expect(throws: FormatError.self) { _ = try ImageHeader.parse(rawWithoutFile) }

        var h = QCOW2Header(size: 1 << 30)
        h.l1Size = 2
        h.l1TableOffset = 0x30000
        h.refcountTableOffset = 0x10000
        h.refcountTableClusters = 1
        let fdeWithoutLUKS = ImageHeader(header: h, extensions: [.fullDiskEncryption(offset: 0x40000, length: 0x1000)], backingFileName: nil)
        #expect(throws: FormatError.self) { _ = try ImageHeader.parse(fdeWithoutLUKS.serializeCluster0()!.padded(to: 65536)) }

        var h2 = h
        h2.incompatibleFeatures = [.externalDataFile]
        h2.autoclearFeatures = [.dataFileRaw]
        let rawWithBacking = ImageHeader(header: h2, extensions: [.externalDataFile("d.raw")], backingFileName: "base.qcow2")
        #expect(throws: FormatError.self) { _ = try ImageHeader.parse(rawWithBacking.serializeCluster0()!.padded(to: 65536)) }
        let rawOK = ImageHeader(header: h2, extensions: [.externalDataFile("d.raw")], backingFileName: nil)
        #expect((try? ImageHeader.parse(rawOK.serializeCluster0()!.padded(to: 65536)))?.externalDataFile == "d.raw")
    }

    @Test("v2 image: extensions start at 72, backing name after the end marker")
    func version2() throws {
        var h = QCOW2Header(version: 2, size: 100 << 20)
        h.l1Size = 1
        h.l1TableOffset = 0x30000
        h.refcountTableOffset = 0x10000
        h.refcountTableClusters = 1
        let image = ImageHeader(header: h, extensions: [.backingFormat("qcow2")], backingFileName: "base.qcow2")
        let c0 = try #require(image.serializeCluster0())
        #expect(c0.count == 72 + 16 + 8 + 10)
        let parsed = try ImageHeader.parse(c0.padded(to: 65536))
        #expect(parsed.header.version == 2)
        #expect(parsed.header.backingFileOffset == 96)
        #expect(parsed.backingFileName == "base.qcow2")
        #expect(parsed.backingFormat == "qcow2")
    }

    @Test("cluster 0 that does not fit")
    func doesNotFit() {
        var h = QCOW2Header(clusterBits: 9, size: 1 << 20)
        h.l1Size = 32
        h.l1TableOffset = 0x600
        h.refcountTableOffset = 0x200
        h.refcountTableClusters = 1
        // 112 + 392 + 8 = 512 bytes fit exactly; a backing file name does not.
        let fits = ImageHeader(header: h, extensions: [.featureNameTable(FeatureNameEntry.qemuDefault)], backingFileName: nil)
        #expect(fits.serializeCluster0()?.count == 512)
        let image = ImageHeader(header: h, extensions: [.featureNameTable(FeatureNameEntry.qemuDefault)], backingFileName: "base.qcow2")
        #expect(image.serializeCluster0() == nil)
    }
}
