import QCOW2Format
import Synchronization

/// An opened image with its whole backing chain: the library's main entry point.
///
/// ```swift
/// let disk = try DiskImage.open(path: "vm.qcow2")
/// var buffer = [UInt8](repeating: 0, count: 4096)
/// try buffer.withUnsafeMutableBytes { try disk.read(at: 0, into: $0) }
/// ```
///
/// Reads are thread-safe: several threads may read at once. A read of a guest range costs
/// a chain-index lookup plus one `pread` per extent, independent of the chain's depth.
public final class DiskImage: BlockDevice, Sendable {
    /// Path of the top image, as given.
    public let path: String
    public let virtualSize: UInt64
    let layers: [Layer]
    let files: OpenFileCache
    let index: ChainIndex
    private let compressedCache: Mutex<LRUCache<CompressedKey, [UInt8]>>
    /// The top image's handle, kept open for the lifetime of the image so that its OFD
    /// locks stay held even when the open-file cache closes other descriptors.
    private let topHandle: FileHandle
    /// Set once by `open` for writable images, never changed afterwards.
    nonisolated(unsafe) private var writer: ImageWriter?
    nonisolated(unsafe) private var rawWriter: FileHandle?
    nonisolated(unsafe) private var durableRaw = true

    /// Makes partial-sector writes of encrypted images atomic (see `SectorWriteLock`).
    private let sectorLock = SectorWriteLock()

    private struct CompressedKey: Hashable { var layer: Int32; var host: UInt64 }
    /// Per layer: data clusters that are holes in the file report as zero (see
    /// `QCOW2Layer.detectMetadataPreallocation`). Computed on first use by `allocationMap`.
    private let holesReadAsZero = Mutex<[Int32: Bool]>([:])

    private init(path: String, layers: [Layer], files: OpenFileCache, options: OpenOptions, top: FileHandle) {
        self.path = path
        topHandle = top
        self.layers = layers
        self.files = files
        virtualSize = layers[0].virtualSize
        index = ChainIndex(layers: layers, files: files, l2Cache: L2SliceCache(budget: options.l2CacheSize),
                           budget: options.indexCacheSize)
        compressedCache = Mutex(LRUCache(budget: options.compressedCacheSize))
    }

    /// Opens an image and its backing chain.
    public static func open(path: String, options: OpenOptions = OpenOptions()) throws -> DiskImage {
        let maxOpen = options.maxOpenFiles ?? max(16, Paths.openFileLimit() / 4)
        let files = OpenFileCache(maxOpenFiles: maxOpen, writable: options.writable)
        let layers = try ChainOpener.open(path: path, options: options, files: files)
        let top = try files.handle(FileKey(layer: 0, dataFile: false))
        try top.lockImage(forWriting: options.writable)
        let disk = DiskImage(path: path, layers: layers, files: files, options: options, top: top)
        if options.writable {
            switch layers[0] {
            case let .qcow2(layer):
                let dataFile = layer.dataFilePath != nil ? try files.handle(FileKey(layer: 0, dataFile: true)) : nil
                let hasBacking = layer.image.backingFileName != nil
                let sawBacking = layers.count > 1
                disk.writer = try ImageWriter(
                    layer: layer, file: top, dataFile: dataFile, l2Cache: disk.index.l2Cache, hasBacking: hasBacking,
                    readGuest: { [unowned disk] offset, buffer in
                        // Copy-on-write must see the backing file; refuse rather than fill with zeros.
                        guard sawBacking || !hasBacking else {
                            throw QCOW2Error.invalidArgument("\(path): opened without its backing file, so partial cluster writes are not possible")
                        }
                        try disk.read(at: offset, into: buffer)
                    },
                    invalidate: { [unowned disk] start, end in
                        // Whole clusters change owner even when only part of one was written
                        // (copy-on-write), so refresh whole clusters. Patch cached resolutions;
                        // if that fails, forget them instead.
                        let cs = layer.geometry.clusterSize
                        let s = start & ~(cs - 1), e = min(disk.virtualSize, (end + cs - 1) & ~(cs - 1))
                        do { try disk.index.refresh(start: s, end: e) } catch { disk.index.invalidate(start: s, end: e) }
                    },
                    statusZero: { [unowned disk] start, end in
                        try disk.allocationMap(offset: start, length: end - start).allSatisfy { $0.zero }
                    })
            case .raw:
                disk.rawWriter = top
            }
            disk.writer?.durable = options.durableFlush
            disk.durableRaw = options.durableFlush
        }
        return disk
    }

    /// True when the top image is encrypted (LUKS or legacy AES).
    public var isEncrypted: Bool {
        if case let .qcow2(l) = layers[0] { return l.encryption != nil }
        return false
    }

    private func isEncrypted(depth: Int32) -> Bool {
        if case let .qcow2(l) = layers[Int(depth)] { return l.encryption != nil }
        return false
    }

    /// True when the image was opened for writing.
    public var isWritable: Bool { writer != nil || rawWriter != nil }

    // MARK: Writing

    private func checkRange(_ offset: UInt64, _ count: UInt64) throws {
        guard offset <= virtualSize, count <= virtualSize - offset else {
            throw QCOW2Error.invalidArgument("request of \(count) bytes at offset \(offset) is past the end of the disk (\(virtualSize) bytes)")
        }
        guard isWritable else { throw QCOW2Error.invalidArgument("\(path): image is opened read-only") }
    }

    /// Writes `data` at `offset`: in place where the top layer owns the cluster, otherwise
    /// into a newly allocated cluster filled by copy-on-write from the chain.
    public func write(at offset: UInt64, from data: UnsafeRawBufferPointer) throws {
        try checkRange(offset, UInt64(data.count))
        guard !data.isEmpty else { return }
        if let writer {
            guard writer.encryption != nil else { return try writer.write(at: offset, data) }
            let end = offset + UInt64(data.count)
            guard offset % 512 != 0 || (end % 512 != 0 && end != virtualSize) else {
                return try sectorLock.withShared { try writer.write(at: offset, data) }
            }
            try sectorLock.withExclusive {
                let (start, buffer) = try sectorAligned(offset, data)
                defer { buffer.deallocate() }
                try writer.write(at: start, UnsafeRawBufferPointer(buffer))
            }
        } else {
            try rawWriter?.write(data, at: offset)
        }
    }

    /// Encrypted images are written in whole 512-byte sectors (QEMU's request alignment for
    /// encrypted qcow2): for an unaligned request, the covering sectors read back from the
    /// image with `data` on top. The caller deallocates the buffer.
    private func sectorAligned(_ offset: UInt64, _ data: UnsafeRawBufferPointer) throws -> (UInt64, UnsafeMutableRawBufferPointer) {
        let end = offset + UInt64(data.count)
        let start = offset & ~511
        let alignedEnd = min(virtualSize, (end + 511) & ~511)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(alignedEnd - start), alignment: 4096)
        do {
            try read(at: start, into: buffer)
        } catch {
            buffer.deallocate()
            throw error
        }
        UnsafeMutableRawBufferPointer(rebasing: buffer[Int(offset - start)..<Int(end - start)]).copyMemory(from: data)
        return (start, buffer)
    }

    /// Makes a range read as zeros; `unmap` allows releasing the host clusters.
    public func writeZeroes(at offset: UInt64, length: UInt64, unmap: Bool = false) throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        if let writer {
            let end = offset + length
            if writer.encryption != nil && (offset % 512 != 0 || (end % 512 != 0 && end != virtualSize)) {
                // Encrypted: the partial sectors at the ends become encrypted zeros (a
                // read-modify-write), the aligned middle goes the usual zero-cluster way.
                let head = min(end, (offset + 511) & ~511)
                let tail = end % 512 == 0 || end == virtualSize ? end : max(head, end & ~511)
                if offset < head { try writeZeroBytes(offset, head) }
                if head < tail { try sectorLock.withShared { try writer.writeZeroes(at: head, length: tail - head, unmap: unmap) } }
                if tail < end { try writeZeroBytes(tail, end) }
                return
            }
            if writer.encryption != nil {
                return try sectorLock.withShared { try writer.writeZeroes(at: offset, length: length, unmap: unmap) }
            }
            try writer.writeZeroes(at: offset, length: length, unmap: unmap)
        } else if let raw = rawWriter {
            // As QEMU's file driver: punch a hole when unmapping is allowed, else zero the
            // range in place; write zeros (in bounded chunks) only as a fallback.
            if unmap && raw.punchHole(at: offset, length: length) { return }
            if raw.zeroRange(at: offset, length: length) { return }
            try raw.writeZeros(at: offset, length: length)
        }
    }

    private func writeZeroBytes(_ from: UInt64, _ to: UInt64) throws {
        guard to > from else { return }
        let zeros = [UInt8](repeating: 0, count: Int(to - from))
        try zeros.withUnsafeBytes { try write(at: from, from: $0) }
    }

    /// Guest discard (TRIM): whole clusters read as zeros afterwards and their space is freed.
    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkRange(offset, length)
        guard length > 0 else { return }
        if let writer { try writer.discard(at: offset, length: length) } else { rawWriter?.punchHole(at: offset, length: length) }
    }

    /// Writes one whole cluster compressed (qcow2 only, over an unallocated cluster).
    public func writeCompressed(at offset: UInt64, from data: UnsafeRawBufferPointer) throws {
        try checkRange(offset, UInt64(data.count))
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): compressed writes need a writable qcow2 image") }
        // QEMU stores compressed clusters unencrypted; never leak guest data that way.
        guard writer.encryption == nil else {
            throw QCOW2Error.invalidArgument("\(path): Compression and encryption not supported at the same time")
        }
        try writer.writeCompressed(clusterStart: offset, data)
    }

    /// Cluster size of the top layer (the unit of compressed writes), or 64 KiB for raw.
    public var clusterSize: UInt64 {
        if case let .qcow2(l) = layers[0] { return l.geometry.clusterSize }
        return 65536
    }

    /// Changes the virtual size of the top image (reopen to see the new size). Shrinking
    /// must be allowed explicitly, as with `qemu-img resize --shrink`.
    public func resize(to newSize: UInt64, allowShrink: Bool) throws {
        guard isWritable else { throw QCOW2Error.invalidArgument("\(path): image is opened read-only") }
        if let writer {
            try writer.resize(to: newSize, allowShrink: allowShrink)
        } else if let raw = rawWriter {
            guard newSize >= virtualSize || allowShrink else {
                throw QCOW2Error.invalidArgument("Use the --shrink option to perform a shrink operation.")
            }
            try raw.truncate(to: newSize)
            try raw.sync()
        }
    }

    /// Rewrites the top image's backing file name and format (header only).
    public func setBacking(name: String?, format: String?) throws {
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): a writable qcow2 image is needed") }
        try writer.setBacking(name: name, format: format)
    }

    /// Changes qcow2 creation options in place, as `qemu-img amend` does.
    ///
    /// - Parameters:
    ///   - compat: "1.1" or "0.10" to upgrade or downgrade the header version.
    ///   - backing: a new backing file name and format (header only, like `rebase -u`).
    public func amend(compat: String? = nil, lazyRefcounts: Bool? = nil, refcountBits: Int? = nil,
                      backing: (name: String?, format: String?)? = nil) throws {
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): amend needs a writable qcow2 image") }
        try writer.amend(compat: compat, lazyRefcounts: lazyRefcounts, refcountBits: refcountBits, backing: backing)
    }

    /// Preallocates a freshly created qcow2 image ("metadata", "falloc" or "full").
    public func preallocate(mode: String) throws {
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): preallocation needs a writable qcow2 image") }
        try writer.preallocate(mode: mode)
    }

    // MARK: Internal snapshots

    /// The top image's internal snapshots.
    public func snapshots() throws -> [SnapshotTableEntry] {
        try ImageFiles.snapshots(of: chain[0])
    }

    /// Takes an internal snapshot of the current state (qemu-img snapshot -c).
    @discardableResult
    public func createSnapshot(name: String) throws -> SnapshotTableEntry {
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): snapshots need a writable qcow2 image") }
        return try writer.createSnapshot(name: name)
    }

    /// Reverts to a snapshot, by ID or name (qemu-img snapshot -a). Reopen the image afterwards.
    public func applySnapshot(_ key: String) throws {
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): snapshots need a writable qcow2 image") }
        try writer.applySnapshot(key)
    }

    /// Deletes a snapshot, by ID or name (qemu-img snapshot -d).
    public func deleteSnapshot(_ key: String) throws {
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): snapshots need a writable qcow2 image") }
        try writer.deleteSnapshot(key)
    }

    /// Empties the top image: every cluster is discarded so the backing file shows through.
    public func makeEmpty() throws {
        guard let writer else { throw QCOW2Error.invalidArgument("\(path): a writable qcow2 image is needed") }
        try writer.makeEmpty()
    }

    /// Makes every completed write durable.
    public func flush() throws {
        if let writer { try writer.flush() } else if durableRaw { try rawWriter?.sync() }
    }

    /// Flushes and finishes writing (clears the dirty bit set for lazy refcounts).
    public func closeWriting() throws {
        if let writer { try writer.close() } else if durableRaw { try rawWriter?.sync() }
    }

    /// Number of layers (1 for an image without a backing file).
    public var chainDepth: Int { layers.count }

    /// Facts about each layer, top first.
    public var chain: [LayerInfo] {
        layers.map { layer in
            switch layer {
            case let .qcow2(l): return LayerInfo(qcow2: l)
            case let .raw(l): return LayerInfo(raw: l)
            }
        }
    }

    /// Finishes writing (if writable) and closes the chain's files.
    public func close() throws {
        try closeWriting()
        topHandle.unlockImage()
        files.closeAll()
    }

    // MARK: Reading

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let count = UInt64(buffer.count)
        guard offset <= virtualSize, count <= virtualSize - offset else {
            throw QCOW2Error.invalidArgument("read of \(count) bytes at offset \(offset) is past the end of the disk (\(virtualSize) bytes)")
        }
        guard let base = buffer.baseAddress else { return }
        let end = offset + count
        var pos = offset
        while pos < end {
            let r = pos >> UInt64(index.regionBits)
            let extents = try index.region(r)
            guard !extents.isEmpty else { throw QCOW2Error.invalidArgument("internal: empty region \(r)") }
            var i = ChainIndex.find(extents, pos)
            while pos < end && i < extents.count {
                let e = extents[i]
                let n = min(e.end, end) - pos
                let dest = UnsafeMutableRawBufferPointer(start: base + Int(pos - offset), count: Int(n))
                try readExtent(e, at: pos, into: dest)
                pos += n
                i += 1
            }
        }
    }

    private func readExtent(_ e: ChainExtent, at pos: UInt64, into dest: UnsafeMutableRawBufferPointer) throws {
        switch e.piece.kind {
        case .unallocated, .zero:
            dest.initializeMemory(as: UInt8.self, repeating: 0)
        case .data:
            let file = try files.handle(FileKey(layer: e.depth, dataFile: e.piece.inDataFile))
            let host = e.piece.host + (pos - e.start)
            if case let .qcow2(layer) = layers[Int(e.depth)], let encryption = layer.encryption {
                try encryption.read(file: file, host: host, guest: pos, into: dest)
            } else {
                try file.read(into: dest, at: host)
            }
        case .compressed:
            let cluster = try decompressedCluster(e)
            let from = Int(pos - e.piece.clusterStart)
            cluster.withUnsafeBytes { src in
                dest.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[from..<(from + dest.count)]))
            }
        }
    }

    private func decompressedCluster(_ e: ChainExtent) throws -> [UInt8] {
        let key = CompressedKey(layer: e.depth, host: e.piece.host)
        if let hit = compressedCache.withLock({ $0.value(for: key) }) { return hit }
        guard case let .qcow2(layer) = layers[Int(e.depth)] else {
            throw QCOW2Error.invalidArgument("internal: compressed extent in a raw layer")
        }
        let file = try files.handle(FileKey(layer: e.depth, dataFile: false))
        let clusterSize = Int(layer.geometry.clusterSize)
        // The descriptor's size is at most a cluster plus a sector; it may run past EOF
        // (the file ends at the last compressed byte), which reads as zeros.
        let input = try file.read(count: Int(e.piece.compressedSize), at: e.piece.host)
        var output = [UInt8](repeating: 0, count: clusterSize)
        let ok = input.withUnsafeBytes { inRaw in
            output.withUnsafeMutableBytes { outRaw in
                ClusterCodec.decompress(layer.header.compressionType, input: inRaw, output: outRaw)
            }
        }
        guard ok else {
            throw QCOW2Error.corrupt(path: layer.path, "could not decompress the cluster at guest offset 0x\(String(e.piece.clusterStart, radix: 16)) (host 0x\(String(e.piece.host, radix: 16)), \(e.piece.compressedSize) bytes, \(layer.header.compressionType))")
        }
        compressedCache.withLock { $0.insert(output, for: key, cost: clusterSize) }
        return output
    }

    // MARK: Allocation map

    public func allocationMap(offset: UInt64, length: UInt64) throws -> [AllocationExtent] {
        guard offset < virtualSize else { return [] }
        let end = offset + min(length, virtualSize - offset)
        var out: [AllocationExtent] = []
        var pos = offset
        while pos < end {
            let extents = try index.region(pos >> UInt64(index.regionBits))
            var i = ChainIndex.find(extents, pos)
            while pos < end && i < extents.count {
                let e = extents[i]
                let n = min(e.end, end) - pos
                for a in try splitByFileHoles(allocationExtent(e, start: pos, length: n), e) {
                    if let last = out.last, last.canMerge(with: a) {
                        out[out.count - 1].length += a.length
                    } else {
                        out.append(a)
                    }
                }
                pos += n
                i += 1
            }
        }
        return out
    }

    /// For metadata-preallocated qcow2 layers, marks data that is a hole in the file as
    /// zero, as QEMU's block-status recursion into the file does.
    private func splitByFileHoles(_ a: AllocationExtent, _ e: ChainExtent) throws -> [AllocationExtent] {
        guard a.data, !a.compressed, let offset = a.offset, case let .qcow2(layer) = layers[Int(e.depth)] else { return [a] }
        let depth = e.depth
        let cached = holesReadAsZero.withLock { $0[depth] }
        let detect: Bool
        if let cached {
            detect = cached
        } else {
            detect = try layer.detectMetadataPreallocation(file: try files.handle(FileKey(layer: depth, dataFile: false)))
            holesReadAsZero.withLock { $0[depth] = detect }
        }
        guard detect else { return [a] }
        let file = try files.handle(FileKey(layer: depth, dataFile: e.piece.inDataFile))
        var out: [AllocationExtent] = []
        var pos = offset
        let end = offset + a.length
        while pos < end {
            var piece = a
            let dataAt = file.nextData(from: pos) ?? end
            let runEnd: UInt64
            if dataAt > pos {
                runEnd = min(end, dataAt)
                piece.zero = true
            } else {
                runEnd = min(end, file.nextHole(from: pos) ?? end)
            }
            guard runEnd > pos else { return [a] }
            piece.start = a.start + (pos - offset)
            piece.length = runEnd - pos
            piece.offset = pos
            out.append(piece)
            pos = runEnd
        }
        return out
    }

    private func allocationExtent(_ e: ChainExtent, start: UInt64, length: UInt64) -> AllocationExtent {
        let p = e.piece
        var offset: UInt64?
        var file: String?
        // Like QEMU, no host offset for encrypted layers (the bytes there are ciphertext).
        if p.hasHost && p.kind != .compressed && !isEncrypted(depth: e.depth) {
            offset = p.host + (start - p.start)
            file = files.path(FileKey(layer: e.depth, dataFile: p.inDataFile))
        }
        return AllocationExtent(
            start: start, length: length, depth: Int(e.depth), present: e.present,
            zero: p.kind == .zero || p.kind == .unallocated, data: p.kind == .data || p.kind == .compressed,
            offset: offset, compressed: p.kind == .compressed, file: file)
    }
}

/// Facts about one layer of an opened chain (what `qemu-img info` reports).
public struct LayerInfo: Sendable {
    public var path: String
    public var format: String
    public var virtualSize: UInt64
    /// The parsed cluster 0 (nil for raw layers).
    public var header: ImageHeader?
    /// The backing file name as stored, and as resolved.
    public var backingFileName: String?
    public var fullBackingFileName: String?
    public var dataFile: String?
    /// How the layer is encrypted (nil: not encrypted).
    public var encryption: EncryptionInfo?

    init(qcow2 l: QCOW2Layer) {
        path = l.path
        format = "qcow2"
        virtualSize = l.virtualSize
        header = l.image
        backingFileName = l.image.backingFileName
        fullBackingFileName = l.image.backingFileName.map { Paths.resolve($0, relativeTo: l.path) }
        dataFile = l.image.externalDataFile
        encryption = l.encryption?.info
    }

    init(raw l: RawLayer) {
        path = l.path
        format = "raw"
        virtualSize = l.virtualSize
    }
}
