// libFuzzer target: the write path on a (small, mutated) image.
// The input is written to a private temp file and opened read-write (backing and external
// data files not followed); then a few writes (partial and whole clusters), zero writes,
// a discard, a compressed write, a flush, a snapshot create/delete, close; and finally the
// checker with repair (`check -r all`) on the result. Every failure must be a thrown error,
// never a trap, a hang or unbounded memory.
import QCOW2
import QCOW2Format
#if canImport(Glibc)
import Glibc
#endif

let fuzzWritePath: String = {
    // Hostile L2 entries can point terabytes past the end of the file; a snapshot create then
    // grows the refcount structures (and the sparse file) to cover them, like QEMU 7.2 does
    // (reported). Cap file growth at 256 MiB so such inputs fail fast (EFBIG) instead of
    // spending minutes in the check, and the fuzzer keeps exploring.
    signal(SIGXFSZ, SIG_IGN)
    var limit = rlimit(rlim_cur: 256 << 20, rlim_max: 256 << 20)
    setrlimit(__rlimit_resource_t(RLIMIT_FSIZE.rawValue), &limit)
    return makeFuzzInputPath("write")
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let path = fuzzWritePath
    writeFuzzInput(data, size, to: path)

    var options = OpenOptions(format: "qcow2", writable: true)
    options.followBackingFiles = false
    options.allowExternalDataFiles = false
    options.durableFlush = false
    options.l2CacheSize = 1 << 20
    options.indexCacheSize = 4 << 20
    options.compressedCacheSize = 1 << 20
    guard let disk = try? DiskImage.open(path: path, options: options) else { return 0 }
    let vsize = disk.virtualSize
    let cs = max(512, disk.clusterSize)
    let buffer = [UInt8](repeating: 0x5A, count: Int(min(cs * 2, 1 << 21)))
    func put(_ offset: UInt64, _ count: Int) {
        guard vsize > 0, offset < vsize else { return }
        let n = Int(min(UInt64(min(count, buffer.count)), vsize - offset))
        _ = try? buffer.withUnsafeBytes { try disk.write(at: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
    }
    // Selector bytes from the end of the input steer the offsets a little.
    let sel = size > 0 ? UInt64(data[size - 1]) : 0
    put(0, 4096)
    put(vsize / 2 / cs * cs, Int(cs))
    put((vsize / 3) | 511, 1500)
    put(vsize > cs ? vsize - cs : 0, Int(cs))
    _ = try? disk.writeZeroes(at: min(vsize, cs * sel), length: min(cs * 3, vsize - min(vsize, cs * sel)), unmap: sel & 1 == 0)
    _ = try? disk.discard(at: min(vsize, cs * (sel / 2)), length: min(cs * 2, vsize - min(vsize, cs * (sel / 2))))
    let cOff = (vsize / 4) / cs * cs
    if cOff + cs <= vsize {
        _ = try? buffer.withUnsafeBytes { try disk.writeCompressed(at: cOff, from: UnsafeRawBufferPointer(rebasing: $0[0..<Int(cs)])) }
    }
    _ = try? disk.flush()
    if let s = try? disk.createSnapshot(name: "fz") {
        put(0, 512)
        _ = try? disk.deleteSnapshot(s.name)
    }
    _ = try? disk.snapshots().first.map { try disk.deleteSnapshot($0.name) }
    try? disk.close()

    let prefix = Array(UnsafeBufferPointer(start: data, count: min(size, 2 << 20)))
    if let h = try? ImageHeader.parse(prefix), h.backingFileName == nil, h.externalDataFile == nil,
       !h.header.hasExternalDataFile,
       let check = try? ImageCheck(path: path, format: "qcow2", repair: .all) {
        _ = try? check.run(repair: .all) { _ in }
    }
    return 0
}
