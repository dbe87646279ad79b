/// One entry of the internal snapshot table (format doc §8.1). Entries are 8-byte aligned;
/// the last one is not padded.
///
/// The ID and name are byte strings, as in QEMU (`char *`), not UTF-8: they are kept as
/// the raw bytes read from disk so that a table is rewritten byte for byte, whatever an
/// image (or a hostile file) put there. `id` and `name` are lossy `String` views for
/// display; lookups compare bytes (`hasID`, `hasName`), as QEMU's `strcmp` does.
public struct SnapshotTableEntry: Sendable, Equatable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    /// The unique ID string, raw bytes as stored (`id_str_size` bytes).
    public var idBytes: [UInt8]
    /// The name, raw bytes as stored (`name_size` bytes).
    public var nameBytes: [UInt8]
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    /// VM state size (the 64-bit extra-data field when present, else the legacy 32-bit one).
    public var vmStateSize: UInt64
    /// Virtual disk size when the snapshot was taken (nil: use the image's current size).
    public var diskSize: UInt64?
    /// Record/replay instruction count; nil when absent, `UInt64.max` when "not recorded".
    public var icount: UInt64?
    /// Extra data past the three known fields, kept verbatim.
    public var unknownExtraData: [UInt8]

    public init(l1TableOffset: UInt64, l1Size: UInt32, idBytes: [UInt8], nameBytes: [UInt8], dateSeconds: UInt32,
                dateNanoseconds: UInt32, vmClockNanoseconds: UInt64, vmStateSize: UInt64,
                diskSize: UInt64?, icount: UInt64?, unknownExtraData: [UInt8] = []) {
        self.l1TableOffset = l1TableOffset
        self.l1Size = l1Size
        self.idBytes = idBytes
        self.nameBytes = nameBytes
        self.dateSeconds = dateSeconds
        self.dateNanoseconds = dateNanoseconds
        self.vmClockNanoseconds = vmClockNanoseconds
        self.vmStateSize = vmStateSize
        self.diskSize = diskSize
        self.icount = icount
        self.unknownExtraData = unknownExtraData
    }

    /// An entry whose ID and name are the UTF-8 bytes of `id` and `name`.
    public init(l1TableOffset: UInt64, l1Size: UInt32, id: String, name: String, dateSeconds: UInt32,
                dateNanoseconds: UInt32, vmClockNanoseconds: UInt64, vmStateSize: UInt64,
                diskSize: UInt64?, icount: UInt64?, unknownExtraData: [UInt8] = []) {
        self.init(l1TableOffset: l1TableOffset, l1Size: l1Size, idBytes: Array(id.utf8), nameBytes: Array(name.utf8),
                  dateSeconds: dateSeconds, dateNanoseconds: dateNanoseconds, vmClockNanoseconds: vmClockNanoseconds,
                  vmStateSize: vmStateSize, diskSize: diskSize, icount: icount, unknownExtraData: unknownExtraData)
    }

    /// The ID as QEMU sees it: a C string, so it ends at the first NUL byte.
    public var idCString: ArraySlice<UInt8> { Self.cString(idBytes) }
    /// The name as QEMU sees it: a C string, so it ends at the first NUL byte.
    public var nameCString: ArraySlice<UInt8> { Self.cString(nameBytes) }

    /// The ID for display: invalid UTF-8 shows as U+FFFD. Not for lookups (see `hasID`).
    public var id: String { String(decoding: idCString, as: UTF8.self) }
    /// The name for display: invalid UTF-8 shows as U+FFFD. Not for lookups (see `hasName`).
    public var name: String { String(decoding: nameCString, as: UTF8.self) }

    /// QEMU's `strcmp(sn->id_str, key) == 0`: the UTF-8 bytes of `key` against the stored bytes.
    public func hasID(_ key: String) -> Bool { idCString.elementsEqual(key.utf8) }
    /// QEMU's `strcmp(sn->name, key) == 0`: the UTF-8 bytes of `key` against the stored bytes.
    public func hasName(_ key: String) -> Bool { nameCString.elementsEqual(key.utf8) }

    private static func cString(_ bytes: [UInt8]) -> ArraySlice<UInt8> {
        bytes[..<(bytes.firstIndex(of: 0) ?? bytes.endIndex)]
    }

    /// Parses `count` entries from the snapshot table bytes, validating every length.
    public static func parseTable(_ bytes: [UInt8], count: Int, clusterSize: UInt64) throws(FormatError) -> [SnapshotTableEntry] {
        let r = ByteReader(bytes, structure: "snapshot table")
        var entries: [SnapshotTableEntry] = []
        entries.reserveCapacity(min(count, 1024))
        var offset = 0
        for i in 0..<count {
            offset = (offset + 7) & ~7
            let l1Offset = try r.u64(offset)
            let l1Size = try r.u32(offset + 8)
            let idSize = Int(try r.u16(offset + 12))
            let nameSize = Int(try r.u16(offset + 14))
            let dateSec = try r.u32(offset + 16)
            let dateNsec = try r.u32(offset + 20)
            let vmClock = try r.u64(offset + 24)
            let vmState32 = try r.u32(offset + 32)
            let extraSize = try r.u32(offset + 36)
            guard extraSize <= QCOW2Limits.maxSnapshotExtraData else {
                throw .invalidField("snapshot \(i) extra_data_size", value: UInt64(extraSize), reason: "too much extra metadata (max 1024)")
            }
            guard l1Offset % clusterSize == 0 else {
                throw .invalidField("snapshot \(i) l1_table_offset", value: l1Offset, reason: "not cluster aligned")
            }
            guard UInt64(l1Size) <= QCOW2Limits.maxL1Entries else {
                throw .invalidField("snapshot \(i) l1_size", value: UInt64(l1Size), reason: "snapshot L1 table too large")
            }
            let extraStart = offset + 40
            let extra = try r.slice(extraStart, Int(extraSize))
            var vmState = UInt64(vmState32)
            var diskSize: UInt64?
            var icount: UInt64?
            let er = ByteReader(extra, structure: "snapshot extra data")
            if extra.count >= 8 { vmState = try er.u64(0) }
            if extra.count >= 16 { diskSize = try er.u64(8) }
            if extra.count >= 24 { icount = try er.u64(16) }
            let unknown = extra.count > 24 ? Array(extra[24...]) : []
            let idStart = extraStart + Int(extraSize)
            // Raw bytes: QEMU treats both as byte strings, and re-encoding would change them.
            let id = try r.slice(idStart, idSize)
            let name = try r.slice(idStart + idSize, nameSize)
            offset = idStart + idSize + nameSize
            guard UInt64(offset) <= QCOW2Limits.maxSnapshotTableBytes else {
                throw .malformed("snapshot table is too big")
            }
            entries.append(SnapshotTableEntry(
                l1TableOffset: l1Offset, l1Size: l1Size, idBytes: id, nameBytes: name, dateSeconds: dateSec,
                dateNanoseconds: dateNsec, vmClockNanoseconds: vmClock, vmStateSize: vmState,
                diskSize: diskSize, icount: icount, unknownExtraData: unknown))
        }
        return entries
    }

    /// Serializes this entry (unpadded; the table writer pads between entries).
    public func serialize() -> [UInt8] {
        var b: [UInt8] = []
        // Lengths are 16-bit on disk. A parsed entry always fits; an entry built through the
        // API with a longer name is cut at 65535 bytes instead of trapping (QEMU asserts
        // here; its snapshot create already cuts names to 255 bytes, as createSnapshot does).
        let idBytes = Array(self.idBytes.prefix(Int(UInt16.max))), nameBytes = Array(self.nameBytes.prefix(Int(UInt16.max)))
        b.appendBE(l1TableOffset)
        b.appendBE(l1Size)
        b.appendBE(UInt16(idBytes.count))
        b.appendBE(UInt16(nameBytes.count))
        b.appendBE(dateSeconds)
        b.appendBE(dateNanoseconds)
        b.appendBE(vmClockNanoseconds)
        b.appendBE(vmStateSize > UInt64(UInt32.max) ? UInt32(0) : UInt32(vmStateSize))
        b.appendBE(UInt32(24 + unknownExtraData.count))
        b.appendBE(vmStateSize)
        b.appendBE(diskSize ?? 0)
        b.appendBE(icount ?? 0)
        b.append(contentsOf: unknownExtraData)
        b.append(contentsOf: idBytes)
        b.append(contentsOf: nameBytes)
        return b
    }

    /// Serializes a whole table: entries 8-byte aligned, the last one unpadded.
    public static func serializeTable(_ entries: [SnapshotTableEntry]) -> [UInt8] {
        var out: [UInt8] = []
        for e in entries {
            out.append(contentsOf: [UInt8](repeating: 0, count: (8 - out.count % 8) % 8))
            out.append(contentsOf: e.serialize())
        }
        return out
    }

    /// Byte size of the serialized table of `entries` (fixed at 24 bytes of known extra data).
    public static func tableSize(_ entries: [SnapshotTableEntry]) -> Int { serializeTable(entries).count }
}
