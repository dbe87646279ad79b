import ArgumentParser
import QCOW2
import QCOW2Format
#if canImport(Glibc)
import Glibc
#endif

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show information about an image (like qemu-img info).")

    @OptionGroup var image: ImageOptions
    @Flag(name: .customLong("backing-chain"), help: "Show every image of the backing chain.")
    var backingChain = false
    @Option(name: .customLong("output"), help: "human or json.")
    var output: OutputFormat = .human
    @Argument(help: "The image file.") var path: String

    func run() throws {
        try QCOW2Tool.guarded {
            var options = image.openOptions()
            let path = try image.secret.apply(self.path, to: &options)
            // Like qemu-img, plain `info` does not open the backing file, and reads the
            // encryption header without needing the secret.
            options.followBackingFiles = backingChain
            options.allowMissingSecrets = true
            let disk = try DiskImage.open(path: path, options: options)
            let layers = backingChain ? disk.chain : [disk.chain[0]]
            let infos = try layers.map { try ImageInfo(layer: $0) }
            switch output {
            case .json:
                if backingChain {
                    print("[\n" + infos.map { $0.json(indent: 4) }.joined(separator: ",\n") + "\n]")
                } else {
                    print(infos[0].json(indent: 0))
                }
            case .human:
                writeStandardOutput(Array(infos.map { $0.human() }.joined(separator: [UInt8(ascii: "\n")])) + [UInt8(ascii: "\n")])
            }
        }
    }
}

/// What `qemu-img info` reports about one image.
struct ImageInfo {
    var layer: LayerInfo
    var actualSize: UInt64
    var snapshots: [SnapshotTableEntry]

    init(layer: LayerInfo) throws {
        self.layer = layer
        actualSize = try ImageFiles.allocatedSize(path: layer.path)
        snapshots = try ImageFiles.snapshots(of: layer)
    }

    private var formatSpecific: [(String, JSONValue)] {
        guard let h = layer.header?.header else { return [] }
        var data: [(String, JSONValue)] = [("compat", .string(h.version >= 3 ? "1.1" : "0.10"))]
        data.append(("compression-type", .string(h.compressionType.description)))
        if h.version >= 3 { data.append(("lazy-refcounts", .bool(h.compatibleFeatures.contains(.lazyRefcounts)))) }
        data.append(("refcount-bits", .int(Int64(h.refcountBits))))
        if let e = layer.encryption { data.append(("encrypt", EncryptionDisplay.json(e))) }
        if let df = layer.dataFile { data.append(("data-file", .string(df))) }
        if h.hasExternalDataFile { data.append(("data-file-raw", .bool(h.autoclearFeatures.contains(.dataFileRaw)))) }
        if h.version >= 3 {
            data.append(("corrupt", .bool(h.incompatibleFeatures.contains(.corrupt))))
            data.append(("extended-l2", .bool(h.hasExtendedL2)))
        }
        return data
    }

    func json(indent: Int) -> String {
        var obj: [(String, JSONValue)] = []
        if let fmt = layer.header?.backingFormat, layer.backingFileName != nil {
            obj.append(("backing-filename-format", .string(fmt)))
        }
        if !snapshots.isEmpty {
            obj.append(("snapshots", .array(snapshots.map { s in
                .object([
                    ("icount", .int(Int64(bitPattern: s.icount ?? 0))),
                    ("vm-clock-nsec", .int(Int64(s.vmClockNanoseconds % 1_000_000_000))),
                    ("name", .string(s.name)),
                    ("date-sec", .int(Int64(s.dateSeconds))),
                    ("date-nsec", .int(Int64(s.dateNanoseconds))),
                    ("vm-clock-sec", .int(Int64(s.vmClockNanoseconds / 1_000_000_000))),
                    ("id", .string(s.id)),
                    ("vm-state-size", .int(Int64(s.vmStateSize))),
                ])
            })))
        }
        obj.append(("virtual-size", .int(Int64(layer.virtualSize))))
        obj.append(("filename", .string(layer.path)))
        if let h = layer.header?.header { obj.append(("cluster-size", .int(Int64(h.clusterSize)))) }
        obj.append(("format", .string(layer.format)))
        obj.append(("actual-size", .int(Int64(actualSize))))
        if layer.header != nil {
            obj.append(("format-specific", .object([("type", .string("qcow2")), ("data", .object(formatSpecific))])))
        }
        if let full = layer.fullBackingFileName { obj.append(("full-backing-filename", .string(full))) }
        if let b = layer.backingFileName { obj.append(("backing-filename", .string(b))) }
        if layer.encryption != nil { obj.append(("encrypted", .bool(true))) }
        let dirty = layer.header?.header.incompatibleFeatures.contains(.dirty) ?? false
        obj.append(("dirty-flag", .bool(dirty)))
        return JSONValue.object(obj).render(indent: indent)
    }

    /// The text block, as bytes: snapshot names are printed raw (see `SnapshotListing.line`).
    func human() -> [UInt8] {
        var lines: [[UInt8]] = []
        func add(_ line: String) { lines.append(Array(line.utf8)) }
        add("image: \(layer.path)")
        add("file format: \(layer.format)")
        add("virtual size: \(humanSize(layer.virtualSize)) (\(layer.virtualSize) bytes)")
        add("disk size: \(humanSize(actualSize))")
        if layer.encryption != nil { add("encrypted: yes") }
        if let h = layer.header?.header { add("cluster_size: \(h.clusterSize)") }
        if let b = layer.backingFileName {
            if let full = layer.fullBackingFileName, full != b {
                add("backing file: \(b) (actual path: \(full))")
            } else {
                add("backing file: \(b)")
            }
            if let f = layer.header?.backingFormat { add("backing file format: \(f)") }
        }
        if !snapshots.isEmpty {
            add("Snapshot list:")
            add(SnapshotListing.header)
            lines.append(contentsOf: snapshots.map(SnapshotListing.line))
        }
        let fs = formatSpecific
        if !fs.isEmpty {
            add("Format specific information:")
            for (k, v) in fs {
                for line in EncryptionDisplay.human(key: k, value: v, indent: 4) { add(line) }
            }
        }
        return Array(lines.joined(separator: [UInt8(ascii: "\n")]))
    }
}

/// qemu-img's snapshot table formatting (`bdrv_snapshot_dump`).
enum SnapshotListing {
    /// `%-10s%-17s%8s%20s%13s%11s` in QEMU's `bdrv_snapshot_dump`.
    static let header = pad("ID", 10) + pad("TAG", 17) + pad("VM SIZE", 8, right: true) + pad("DATE", 20, right: true)
        + pad("VM CLOCK", 13, right: true) + pad("ICOUNT", 11, right: true)

    /// `%-9s %-16s %8s%20s%13s%11s`, as bytes: ID and name are printed raw, like QEMU's
    /// printf of its C strings (a name that is not UTF-8 comes out byte for byte), padded
    /// by byte count as printf does. `bdrv_snapshot_list` copies them into
    /// `QEMUSnapshotInfo` (`id_str[128]`, `name[256]`), so at most 127 and 255 bytes show.
    static func line(_ s: SnapshotTableEntry) -> [UInt8] {
        let date = formatDate(s.dateSeconds)
        let ns = s.vmClockNanoseconds
        let secs = ns / 1_000_000_000
        let clock = "\(zeroPadded(secs / 3600, 2)):\(zeroPadded((secs / 60) % 60, 2)):\(zeroPadded(secs % 60, 2)).\(zeroPadded((ns / 1_000_000) % 1000, 3))"
        let icount = s.icount.map { $0 == UInt64.max ? "" : String($0) } ?? ""
        let vmSize = humanSize(s.vmStateSize)
        let rest = " " + pad(vmSize, 8, right: true) + pad(date, 20, right: true)
            + pad(clock, 13, right: true) + pad(icount, 11, right: true)
        return padBytes(Array(s.idCString.prefix(127)), 9) + [UInt8(ascii: " ")]
            + padBytes(Array(s.nameCString.prefix(255)), 16) + Array(rest.utf8)
    }

    /// printf's `%-Ns` on a byte string.
    static func padBytes(_ b: [UInt8], _ n: Int) -> [UInt8] {
        b.count < n ? b + [UInt8](repeating: UInt8(ascii: " "), count: n - b.count) : b
    }

    static func pad(_ s: String, _ n: Int, right: Bool = false) -> String {
        guard s.count < n else { return s }
        let fill = String(repeating: " ", count: n - s.count)
        return right ? fill + s : s + fill
    }
}

/// Writes raw bytes to standard output (names that are not UTF-8 must come out as stored;
/// `print` takes a String). stdio is flushed first so the bytes land after earlier `print`s.
func writeStandardOutput(_ bytes: [UInt8]) {
    fflush(nil)
    bytes.withUnsafeBytes { raw in
        guard let base = raw.baseAddress else { return }
        var done = 0
        while done < raw.count {
            let n = write(STDOUT_FILENO, base + done, raw.count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }  // stdout closed: nothing useful left to do
            done += n
        }
    }
}

/// Decimal with leading zeros to `width` digits.
func zeroPadded(_ v: UInt64, _ width: Int) -> String {
    let t = String(v)
    return String(repeating: "0", count: max(0, width - t.count)) + t
}

/// "1 GiB", "196 KiB", "1.5 MiB": qemu's `size_to_str`.
func humanSize(_ value: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    var v = Double(value)
    var i = 0
    // QEMU switches unit when the value reaches 1000 of the current unit (0.977 of the next).
    while v >= 1000 && i < units.count - 1 {
        v /= 1024
        i += 1
    }
    if i == 0 { return "\(value) B" }
    // "%0.3g": three significant digits, trailing zeros dropped.
    return "\(threeSignificant(v)) \(units[i])"
}

func threeSignificant(_ v: Double) -> String {
    let digitsBeforePoint = v >= 100 ? 3 : (v >= 10 ? 2 : 1)
    let decimals = max(0, 3 - digitsBeforePoint)
    var scale = 1.0
    for _ in 0..<decimals { scale *= 10 }
    let rounded = (v * scale).rounded() / scale
    var s = String(rounded)
    if s.hasSuffix(".0") { s.removeLast(2) }
    if s.contains(".") {
        while s.hasSuffix("0") { s.removeLast() }
        if s.hasSuffix(".") { s.removeLast() }
    }
    return s
}

func formatDate(_ seconds: UInt32) -> String {
    var t = time_t(seconds)
    var tm = tm()
    localtime_r(&t, &tm)
    func z(_ v: Int32, _ w: Int) -> String { let s = String(v); return String(repeating: "0", count: max(0, w - s.count)) + s }
    return "\(z(tm.tm_year + 1900, 4))-\(z(tm.tm_mon + 1, 2))-\(z(tm.tm_mday, 2)) \(z(tm.tm_hour, 2)):\(z(tm.tm_min, 2)):\(z(tm.tm_sec, 2))"
}
