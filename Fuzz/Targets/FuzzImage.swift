// libFuzzer target: a whole (small, mutated) image through the engine.
// The input is written to a private temp file and opened read-only with DiskImage (backing
// files and external data files are not followed: the input names arbitrary host paths);
// then: read the first MiB and the end of the disk, the allocation map, the snapshot list
// and the first snapshot's content, and — when the image names no other file — the
// read-only consistency check. Every failure must be a thrown error, never a trap, a hang
// or unbounded memory.
import QCOW2
import QCOW2Format
#if canImport(Glibc)
import Glibc
#endif

let fuzzImagePath = makeFuzzInputPath("image")

func exercise(_ disk: DiskImage) {
    let size = disk.virtualSize
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    var pos: UInt64 = 0
    while pos < min(size, 1 << 20) {
        let n = Int(min(UInt64(buffer.count), size - pos))
        _ = try? buffer.withUnsafeMutableBytes { try disk.read(at: pos, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
        pos += UInt64(n)
    }
    if size > 1 << 20 {
        let n = Int(min(UInt64(buffer.count), size - (1 << 20)))
        _ = try? buffer.withUnsafeMutableBytes { try disk.read(at: size - UInt64(n), into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
    }
    _ = try? disk.allocationMap(offset: 0, length: min(size, 64 << 30))
    if size > 64 << 30 { _ = try? disk.allocationMap(offset: size - (1 << 30), length: 1 << 30) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let path = fuzzImagePath
    writeFuzzInput(data, size, to: path)

    var options = OpenOptions(format: "qcow2", writable: false)
    options.followBackingFiles = false
    options.allowExternalDataFiles = false
    options.l2CacheSize = 1 << 20
    options.indexCacheSize = 4 << 20
    options.compressedCacheSize = 1 << 20
    guard let disk = try? DiskImage.open(path: path, options: options) else { return 0 }
    exercise(disk)
    if let snaps = try? disk.snapshots(), let first = snaps.first {
        var snapOptions = options
        snapOptions.snapshot = first.name
        if let snap = try? DiskImage.open(path: path, options: snapOptions) {
            exercise(snap)
            try? snap.close()
        }
    }
    try? disk.close()

    // The checker opens backing and data files like QEMU: only for self-contained images.
    let prefix = Array(UnsafeBufferPointer(start: data, count: min(size, 2 << 20)))
    if let h = try? ImageHeader.parse(prefix), h.backingFileName == nil, h.externalDataFile == nil,
       !h.header.hasExternalDataFile,
       let check = try? ImageCheck(path: path, format: "qcow2", repair: []) {
        _ = try? check.run(repair: []) { _ in }
    }
    return 0
}
