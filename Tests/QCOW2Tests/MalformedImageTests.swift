import Foundation
import Testing

/// An image made by qemu-img and then damaged by patching bytes.
///
/// Judging (per command, `qcow2 info --output=json` and `qcow2 convert -f qcow2 -O raw`):
/// * `.judgedByQemu`: run the same command with qemu-img. If qemu-img fails, ours must fail
///   cleanly (exit 1, one line on stderr). If qemu-img succeeds (it reads zeros past EOF,
///   ignores reserved bits, …), ours may fail cleanly or succeed with the same output.
/// * `.reject`: ours must fail cleanly whatever qemu-img does (qemu-img hangs on backing
///   loops, and needs a key for encrypted images).
/// * `.matchQemu`: a valid, if unusual, image: qemu-img must succeed and ours must match.
/// In every case: no crash (signal) and no hang (20 s per command).
struct MalformedCase: Sendable, CustomTestStringConvertible {
    enum Expectation: Sendable, Equatable { case judgedByQemu, reject, matchQemu }

    var name: String
    var info: Expectation = .judgedByQemu
    var convert: Expectation = .judgedByQemu
    /// When ours fails, its message must contain this (case-insensitive).
    var mentioning: String?
    /// Builds the image in the builder's directory; returns its name.
    var build: @Sendable (ImageBuilder) async throws -> String

    var testDescription: String { name }
}

@Suite("Malformed and hostile images")
struct MalformedImageTests {
    @Test("qcow2 fails cleanly or matches qemu-img", arguments: MalformedCase.all)
    func malformed(_ c: MalformedCase) async throws {
        try await withTempDir(c.name) { tmp in
            let b = ImageBuilder(dir: tmp + "/img")
            try mkdir(b.dir)
            try mkdir(tmp + "/out")
            let image = try await c.build(b)

            // info
            let ourInfo = try await qcow2(["info", "--output=json", image], cwd: b.dir)
            try await judge(ours: ourInfo, expectation: c.info, mentioning: c.mentioning, what: "[\(c.name)] info") {
                try await run("qemu-img", ["info", "--output=json", image], cwd: b.dir)
            } compare: { qemu in
                try compareInfo(ours: ourInfo.stdout, qemu: qemu.stdout, chain: false, context: c.name)
            }

            // convert -f qcow2 -O raw
            let ourRaw = tmp + "/out/ours.raw", qemuRaw = tmp + "/out/qemu.raw"
            let ourConvert = try await qcow2(["convert", "-f", "qcow2", "-O", "raw", image, ourRaw], cwd: b.dir)
            try await judge(ours: ourConvert, expectation: c.convert, mentioning: c.mentioning, what: "[\(c.name)] convert") {
                try await run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", image, qemuRaw], cwd: b.dir)
            } compare: { _ in
                let diff = try fileDifference(ourRaw, qemuRaw)
                #expect(diff == nil, "\(c.name): convert output differs from qemu-img's: \(diff ?? "")")
            }
        }
    }

    func judge(
        ours: ToolResult, expectation: MalformedCase.Expectation, mentioning: String?, what: String,
        qemu: () async throws -> ToolResult, compare: (ToolResult) async throws -> Void
    ) async throws {
        expectSane(ours)
        switch expectation {
        case .reject:
            expectCleanFailure(ours, mentioning: mentioning)
        case .matchQemu:
            let q = try await qemu()
            try #require(q.succeeded, "recipe problem: qemu-img should accept this image: \(q)")
            expectSuccess(ours)
            if ours.succeeded { try await compare(q) }
        case .judgedByQemu:
            let q = try await qemu()
            if !q.succeeded {
                // qemu-img refuses (or hangs): so must we, cleanly.
                expectCleanFailure(ours, mentioning: mentioning)
            } else if ours.succeeded {
                try await compare(q)
            } else {
                // Allowed (refusing is always safe), but worth seeing in the log.
                print("note: \(what): qemu-img accepts, qcow2 refuses: \(ours.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
                expectCleanFailure(ours, mentioning: mentioning)
            }
        }
    }
}

// MARK: - Building damaged images

/// Where the structures of a freshly written image are.
struct BaseLayout {
    var path: String
    var clusterSize: UInt64
    var l1Offset: UInt64
    /// L2 table of L1[0].
    var l2Offset: UInt64
}

let l2OffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00

extension ImageBuilder {
    /// 4 MiB qcow2 (64k clusters unless `options` say otherwise) with data at guest
    /// [0, 128k) and [1M, 1M+64k), plus `extra` qemu-io commands.
    func damagedBase(_ name: String = "a.qcow2", size: String = "4M", options: String? = nil,
                     extra: [String] = []) async throws -> BaseLayout {
        try await create(name, size: size, options: options)
        try await io(name, ["write -P 0x11 0 128k", "write -P 0x22 1M 64k"] + extra)
        return try layout(name)
    }

    func layout(_ name: String) throws -> BaseLayout {
        let p = path(name)
        let cb = try readBE32(p, at: 20)
        let l1 = try readBE64(p, at: 40)
        let l2 = try readBE64(p, at: l1) & l2OffsetMask
        return BaseLayout(path: p, clusterSize: 1 << UInt64(cb), l1Offset: l1, l2Offset: l2)
    }

    /// Host offset of the data cluster mapped by standard L2 entry `index` of the first L2 table.
    func dataOffset(_ l: BaseLayout, entry index: UInt64, entrySize: UInt64 = 8) throws -> UInt64 {
        try readBE64(l.path, at: l.l2Offset + index * entrySize) & l2OffsetMask
    }
}

extension MalformedCase {
    /// A case built from `damagedBase()` plus a patch of the file.
    static func patched(
        _ name: String, options: String? = nil, extra: [String] = [], convert: Expectation = .judgedByQemu,
        info: Expectation = .judgedByQemu, mentioning: String? = nil,
        _ damage: @escaping @Sendable (BaseLayout, ImageBuilder) throws -> Void
    ) -> MalformedCase {
        MalformedCase(name: name, info: info, convert: convert, mentioning: mentioning) { b in
            let l = try await b.damagedBase(options: options, extra: extra)
            try damage(l, b)
            return "a.qcow2"
        }
    }

    static let all: [MalformedCase] = truncation + header + tables + compressed + backing + features + encryption + extendedL2 + valid

    static let truncation: [MalformedCase] = [
        patched("truncated to the 112-byte header") { l, _ in try truncateFile(l.path, to: 112) },
        patched("truncated to 512 bytes") { l, _ in try truncateFile(l.path, to: 512) },
        patched("truncated after cluster 0") { l, _ in try truncateFile(l.path, to: l.clusterSize) },
        patched("truncated after the refcount table") { l, _ in try truncateFile(l.path, to: 2 * l.clusterSize) },
        MalformedCase(name: "truncated mid-L1 (512 B clusters, L1 spans 2 clusters)") { b in
            try await b.create("a.qcow2", size: "4M", options: "cluster_size=512")
            try await b.io("a.qcow2", ["write -P 0x11 0 64k", "write -P 0x22 3M 64k"])
            let l = try b.layout("a.qcow2")
            try truncateFile(l.path, to: l.l1Offset + 8 * 65 + 4)
            return "a.qcow2"
        },
        patched("truncated mid-L1 entry (64k clusters)") { l, _ in try truncateFile(l.path, to: l.l1Offset + 4) },
        patched("truncated mid-L2") { l, _ in try truncateFile(l.path, to: l.l2Offset + 100) },
        patched("truncated inside the last data cluster") { l, b in
            let data = try b.dataOffset(l, entry: 16)
            try truncateFile(l.path, to: data + 1000)
        },
        patched("empty file") { l, _ in try truncateFile(l.path, to: 0) },
    ]

    static let header: [MalformedCase] = [
        patched("bad magic") { l, _ in try patchBE32(l.path, at: 0, 0x1234_5678) },
        patched("version 1") { l, _ in try patchBE32(l.path, at: 4, 1) },
        patched("version 4") { l, _ in try patchBE32(l.path, at: 4, 4) },
        patched("cluster_bits 8") { l, _ in try patchBE32(l.path, at: 20, 8) },
        patched("cluster_bits 22") { l, _ in try patchBE32(l.path, at: 20, 22) },
        patched("cluster_bits 0xffffffff") { l, _ in try patchBE32(l.path, at: 20, 0xFFFF_FFFF) },
        patched("header_length 96") { l, _ in try patchBE32(l.path, at: 100, 96) },
        patched("header_length 100") { l, _ in try patchBE32(l.path, at: 100, 100) },
        patched("header_length 108 (not a multiple of 8)", options: "cluster_size=4k") { l, _ in try patchBE32(l.path, at: 100, 108) },
        patched("header_length larger than the cluster") { l, _ in try patchBE32(l.path, at: 100, 0x20000) },
        patched("l1_size 0 (too small for the virtual size)") { l, _ in try patchBE32(l.path, at: 36, 0) },
        patched("l1_size too small (64 GiB virtual size)") { l, _ in try patchBE64(l.path, at: 24, 64 << 30) },
        patched("l1_size 0x7fffffff") { l, _ in try patchBE32(l.path, at: 36, 0x7FFF_FFFF) },
        patched("virtual size 2^63") { l, _ in try patchBE64(l.path, at: 24, 1 << 63) },
        patched("l1_table_offset unaligned") { l, _ in try patchBE64(l.path, at: 40, l.l1Offset + 0x200) },
        patched("l1_table_offset far past EOF") { l, _ in try patchBE64(l.path, at: 40, 1 << 40) },
        patched("l1_table_offset beyond 2^56") { l, _ in try patchBE64(l.path, at: 40, 1 << 60) },
        patched("l1_table_offset 0 (L1 overlaps the header)") { l, _ in try patchBE64(l.path, at: 40, 0) },
        patched("refcount_table_clusters huge") { l, _ in try patchBE32(l.path, at: 56, 0x7FFF_FFFF) },
        patched("refcount_table_clusters 0") { l, _ in try patchBE32(l.path, at: 56, 0) },
        patched("refcount_table_offset unaligned") { l, _ in try patchBE64(l.path, at: 48, 0x10200) },
        patched("nb_snapshots 65537") { l, _ in try patchBE32(l.path, at: 60, 65537) },
        patched("snapshot table offset unaligned") { l, _ in
            try patchBE32(l.path, at: 60, 1)
            try patchBE64(l.path, at: 64, 0x10200)
        },
        patched("snapshot table past EOF") { l, _ in
            try patchBE32(l.path, at: 60, 3)
            try patchBE64(l.path, at: 64, 1 << 40)
        },
        patched("backing_file_offset > cluster size") { l, _ in
            try patchBE64(l.path, at: 8, l.clusterSize + 1)
            try patchBE32(l.path, at: 16, 4)
        },
        patched("backing_file_size 2000") { l, _ in
            try patchBE64(l.path, at: 8, 0x1F8)
            try patchBE32(l.path, at: 16, 2000)
        },
        patched("header extension longer than cluster 0") { l, _ in try patchBE32(l.path, at: 0x74, 0xFFFF) },
        patched("crypt_method 3") { l, _ in try patchBE32(l.path, at: 32, 3) },
        patched("refcount_order 7") { l, _ in try patchBE32(l.path, at: 96, 7) },
        patched("compression type bit set with zlib") { l, _ in try patchBE64(l.path, at: 72, 1 << 3) },
        patched("zstd compression byte without the feature bit") { l, _ in try patch(l.path, at: 104, [1]) },
        patched("compression type 2") { l, _ in
            try patch(l.path, at: 104, [2])
            try patchBE64(l.path, at: 72, 1 << 3)
        },
        patched("extended L2 bit with 4k clusters", options: "cluster_size=4k") { l, _ in
            try patchBE64(l.path, at: 72, 1 << 4)
        },
    ]

    static let tables: [MalformedCase] = [
        patched("L2 entry pointing past EOF") { l, _ in try patchBE64(l.path, at: l.l2Offset, 0x8000_0100_0000_0000) },
        patched("L2 entry pointing at 2^56 - 64k") { l, _ in try patchBE64(l.path, at: l.l2Offset, 0x80FF_FFFF_FFFF_0000) },
        patched("L1 entry pointing past EOF") { l, _ in try patchBE64(l.path, at: l.l1Offset, 0x8000_1000_0000_0000) },
        patched("L1 entry pointing to an unaligned L2 table") { l, _ in
            try patchBE64(l.path, at: l.l1Offset, 0x8000_0000_0000_0000 | (l.l2Offset + 0x200))
        },
        patched("L1 entry pointing at the header cluster") { l, _ in try patchBE64(l.path, at: l.l1Offset, 0x8000_0000_0000_0000) },
        patched("L1 entry pointing at the L1 table itself") { l, _ in
            try patchBE64(l.path, at: l.l1Offset, 0x8000_0000_0000_0000 | l.l1Offset)
        },
        patched("L2 entry with an unaligned data offset") { l, b in
            let data = try b.dataOffset(l, entry: 0)
            try patchBE64(l.path, at: l.l2Offset, 0x8000_0000_0000_0000 | (data + 0x200))
        },
        patched("L2 entry pointing at the L2 table itself") { l, _ in
            try patchBE64(l.path, at: l.l2Offset, 0x8000_0000_0000_0000 | l.l2Offset)
        },
        patched("L2 entry with reserved bit 56") { l, b in
            let data = try b.dataOffset(l, entry: 0)
            try patchBE64(l.path, at: l.l2Offset, 0x8100_0000_0000_0000 | data)
        },
        MalformedCase(name: "zero flag in a v2 image") { b in
            let l = try await b.damagedBase(options: "compat=0.10")
            let data = try b.dataOffset(l, entry: 0)
            try patchBE64(l.path, at: l.l2Offset, 0x8000_0000_0000_0001 | data)
            return "a.qcow2"
        },
        patched("two L2 entries sharing one data cluster") { l, b in
            let data = try b.dataOffset(l, entry: 0)
            try patchBE64(l.path, at: l.l2Offset + 8 * 5, 0x8000_0000_0000_0000 | data)
        },
    ]

    /// Image with compressed clusters at guest 0 and 64k (64k clusters, x = 54).
    static func compressedCase(_ name: String, type: String = "zlib",
                               _ damage: @escaping @Sendable (BaseLayout, UInt64) throws -> Void) -> MalformedCase {
        MalformedCase(name: name) { b in
            try await b.create("a.qcow2", size: "4M", options: "compression_type=\(type)")
            try await b.io("a.qcow2", ["write -c -P 0x11 0 64k", "write -c -P 0x12 64k 64k", "write -P 0x13 1M 64k"])
            let l = try b.layout("a.qcow2")
            let entry = try readBE64(l.path, at: l.l2Offset)
            try #require(entry & (1 << 62) != 0, "recipe problem: L2[0] is not compressed")
            try damage(l, entry)
            return "a.qcow2"
        }
    }

    static let compressed: [MalformedCase] = [
        compressedCase("compressed descriptor: offset past EOF") { l, _ in
            try patchBE64(l.path, at: l.l2Offset, 0x4000_0000_0000_0000 | (1 << 44))
        },
        compressedCase("compressed descriptor: largest offset") { l, _ in
            try patchBE64(l.path, at: l.l2Offset, 0x4000_0000_0000_0000 | ((1 << 54) - 1))
        },
        compressedCase("compressed descriptor: offset in the header cluster") { l, _ in
            try patchBE64(l.path, at: l.l2Offset, 0x4000_0000_0000_0000 | 0x100)
        },
        compressedCase("compressed descriptor: maximum sector count") { l, entry in
            try patchBE64(l.path, at: l.l2Offset, entry | (0xFF << 54))
        },
        compressedCase("compressed descriptor: copied flag set") { l, entry in
            try patchBE64(l.path, at: l.l2Offset, entry | (1 << 63))
        },
        compressedCase("corrupted deflate stream") { l, entry in
            let off = entry & ((1 << 54) - 1)
            try patch(l.path, at: off, [UInt8](repeating: 0xFF, count: 16))
        },
        compressedCase("corrupted zstd stream", type: "zstd") { l, entry in
            let off = entry & ((1 << 54) - 1)
            try patch(l.path, at: off + 4, [UInt8](repeating: 0xFF, count: 24))
        },
        compressedCase("zstd stream with bad magic", type: "zstd") { l, entry in
            let off = entry & ((1 << 54) - 1)
            try patch(l.path, at: off, [0, 0, 0, 0])
        },
        compressedCase("compressed cluster in a data-file image") { l, _ in
            // Claim an external data file; compressed clusters are then invalid.
            try patchBE64(l.path, at: 72, 1 << 2)
        },
    ]

    static let backing: [MalformedCase] = [
        MalformedCase(name: "backing file names itself", convert: .reject) { b in
            // qemu-img refuses to create this directly: create with another name of the same length, then patch.
            try await b.create("self.qcow2", size: "4M", backing: "xxxx.qcow2", unsafe: true)
            try patchBackingName(b.path("self.qcow2"), from: "xxxx.qcow2", to: "self.qcow2")
            return "self.qcow2"
        },
        MalformedCase(name: "backing chain loop a -> b -> a", convert: .reject) { b in
            try await b.create("a.qcow2", size: "4M", backing: "b.qcow2", unsafe: true)
            try await b.create("b.qcow2", size: "4M", backing: "a.qcow2", unsafe: true)
            return "a.qcow2"
        },
        MalformedCase(name: "backing chain loop a -> b -> c -> b", convert: .reject) { b in
            try await b.create("a.qcow2", size: "4M", backing: "b.qcow2", unsafe: true)
            try await b.create("b.qcow2", size: "4M", backing: "c.qcow2", unsafe: true)
            try await b.create("c.qcow2", size: "4M", backing: "b.qcow2", unsafe: true)
            return "a.qcow2"
        },
        MalformedCase(name: "backing file missing") { b in
            try await b.create("a.qcow2", size: "4M", backing: "missing.qcow2", unsafe: true)
            return "a.qcow2"
        },
        MalformedCase(name: "backing file is a directory") { b in
            try b.mkdir("dir.qcow2")
            try await b.create("a.qcow2", size: "4M", backing: "dir.qcow2", unsafe: true)
            return "a.qcow2"
        },
        MalformedCase(name: "backing file malformed (version 4)") { b in
            let base = try await b.damagedBase("base.qcow2")
            try patchBE32(base.path, at: 4, 4)
            try await b.create("a.qcow2", size: "4M", backing: "base.qcow2", unsafe: true)
            return "a.qcow2"
        },
        MalformedCase(name: "backing format extension too long") { b in
            try await b.create("base.qcow2", size: "4M")
            try await b.create("a.qcow2", size: "4M", backing: "base.qcow2")
            // The backing-format extension is the first one, at header_length (112).
            try #require(try readBE32(b.path("a.qcow2"), at: 112) == 0xE279_2ACA)
            try patchBE32(b.path("a.qcow2"), at: 116, 16)
            return "a.qcow2"
        },
        MalformedCase(name: "external data file missing", info: .judgedByQemu) { b in
            try await b.create("a.qcow2", size: "4M", options: "data_file=data.raw")
            try await b.io("a.qcow2", ["write -P 0x11 0 64k"])
            try FileManager.default.removeItem(atPath: b.path("data.raw"))
            return "a.qcow2"
        },
        MalformedCase(name: "data_file_raw bit without a data file") { b in
            let l = try await b.damagedBase()
            try patchBE64(l.path, at: 88, 1 << 1)
            return "a.qcow2"
        },
    ]

    static let features: [MalformedCase] = [
        patched("unknown incompatible feature bit 6") { l, _ in try patchBE64(l.path, at: 72, 1 << 6) },
        patched("unknown incompatible feature bit 63") { l, _ in try patchBE64(l.path, at: 72, 1 << 63) },
        patched("unknown incompatible bit 6 named in the feature table", mentioning: "frobnicate feature") { l, _ in
            // Feature table at 0x70: entries of 48 bytes from 0x78; entry 4 names incompatible bit 4.
            let entry: UInt64 = 0x78 + 48 * 4
            var bytes: [UInt8] = [0, 6] + Array("frobnicate feature".utf8)
            bytes += [UInt8](repeating: 0, count: 48 - bytes.count)
            try patch(l.path, at: entry, bytes)
            try patchBE64(l.path, at: 72, 1 << 6)
        },
        patched("corrupt bit set") { l, _ in try patchBE64(l.path, at: 72, 1 << 1) },
    ]

    static let encryption: [MalformedCase] = [
        MalformedCase(name: "LUKS-encrypted image", convert: .reject, mentioning: "encrypt") { b in
            // qemu-img's iteration calibration sometimes fails on a loaded VM ("Unable to get
            // accurate CPU usage"); that is QEMU's problem, so retry.
            for attempt in 1...20 {
                do {
                    try await b.img([
                        "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                        "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "a.qcow2", "4M",
                    ])
                    break
                } catch where attempt < 20 {
                    try await Task.sleep(for: .milliseconds(100))
                }
            }
            return "a.qcow2"
        },
        MalformedCase(name: "legacy AES-encrypted image", convert: .reject, mentioning: "encrypt") { b in
            try await b.img([
                "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
                "-o", "encrypt.format=aes,encrypt.key-secret=s0", "a.qcow2", "4M",
            ])
            return "a.qcow2"
        },
    ]

    /// Extended-L2 image: L2[0] normal (full cluster), L2[1] compressed, L2[2..] unallocated.
    static func extendedL2Case(_ name: String, _ damage: @escaping @Sendable (BaseLayout) throws -> Void) -> MalformedCase {
        MalformedCase(name: name) { b in
            try await b.create("a.qcow2", size: "4M", options: "extended_l2=on")
            try await b.io("a.qcow2", ["write -P 0x11 0 64k", "write -c -P 0x12 64k 64k", "write -P 0x13 1M 4k"])
            let l = try b.layout("a.qcow2")
            try damage(l)
            return "a.qcow2"
        }
    }

    static let extendedL2: [MalformedCase] = [
        extendedL2Case("extended L2: alloc and zero bit on one subcluster") { l in
            try patchBE64(l.path, at: l.l2Offset + 8, 0x0000_0001_FFFF_FFFF)
        },
        extendedL2Case("extended L2: alloc bits without a host offset") { l in
            try patchBE64(l.path, at: l.l2Offset + 16 * 2 + 8, 0x0000_0000_0000_0001)
        },
        extendedL2Case("extended L2: compressed cluster with a non-zero bitmap") { l in
            try patchBE64(l.path, at: l.l2Offset + 16 + 8, 0x0000_0000_0000_0001)
        },
        extendedL2Case("extended L2: zero flag set in the standard part") { l in
            let e = try readBE64(l.path, at: l.l2Offset)
            try patchBE64(l.path, at: l.l2Offset, e | 1)
        },
    ]

    /// Valid but unusual images: qemu-img reads them, and so must we.
    static let valid: [MalformedCase] = [
        patched("unknown compatible and autoclear bits", convert: .matchQemu, info: .matchQemu) { l, _ in
            try patchBE64(l.path, at: 80, 0x21)
            try patchBE64(l.path, at: 88, 0x80)
        },
        patched("header_length 104 (no compression type byte)", options: "cluster_size=4k", convert: .matchQemu, info: .matchQemu) { l, _ in
            try patchBE32(l.path, at: 100, 104)
        },
        patched("header_length 120 (unknown trailing header field)", options: "cluster_size=4k", convert: .matchQemu, info: .matchQemu) { l, _ in
            try patchBE32(l.path, at: 100, 120)
        },
        patched("unknown header extension", options: "cluster_size=4k", convert: .matchQemu, info: .matchQemu) { l, _ in
            // 4k clusters: no feature table, the end marker is at 112. Insert one extension before it.
            try patch(l.path, at: 112, [0x12, 0x34, 0x56, 0x78, 0, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0] + [UInt8](repeating: 0, count: 8))
        },
        patched("copied flags cleared everywhere", convert: .matchQemu, info: .matchQemu) { l, _ in
            let l1e = try readBE64(l.path, at: l.l1Offset)
            try patchBE64(l.path, at: l.l1Offset, l1e & ~(1 << 63))
            for i in UInt64(0)..<32 {
                let e = try readBE64(l.path, at: l.l2Offset + 8 * i)
                try patchBE64(l.path, at: l.l2Offset + 8 * i, e & ~(1 << 63))
            }
        },
        patched("dirty bit set without lazy refcounts", convert: .matchQemu, info: .matchQemu) { l, _ in
            try patchBE64(l.path, at: 72, 1)
        },
        patched("L2 entry with reserved bit 1", convert: .matchQemu, info: .matchQemu) { l, b in
            let data = try b.dataOffset(l, entry: 0)
            try patchBE64(l.path, at: l.l2Offset, 0x8000_0000_0000_0002 | data)
        },
    ]
}

/// Replaces the backing file name stored in cluster 0 (same length only).
func patchBackingName(_ path: String, from old: String, to new: String) throws {
    precondition(old.utf8.count == new.utf8.count)
    let offset = try readBE64(path, at: 8)
    let size = try readBE32(path, at: 16)
    let current = try readBytes(path, at: offset, count: Int(size))
    try #require(current == Array(old.utf8), "backing name is \(String(decoding: current, as: UTF8.self))")
    try patch(path, at: offset, Array(new.utf8))
}
