// libFuzzer target: ImageHeader.parse (cluster 0: header, extensions, backing file name),
// also on every prefix length the engine might pass (it reads a prefix, then more on
// `.truncated`), and serializeCluster0 + parse of the result (must not trap).
import QCOW2Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let h = try? QCOW2Header.parse(bytes) {
        let needed = ImageHeader.bytesNeeded(for: h)
        if needed >= 0 && needed < bytes.count { _ = try? ImageHeader.parse(Array(bytes[..<needed])) }
    }
    guard let image = try? ImageHeader.parse(bytes) else { return 0 }
    _ = image.backingFormat
    _ = image.externalDataFile
    _ = image.featureNameTable
    _ = image.fullDiskEncryption
    _ = image.bitmaps
    _ = image.header.unknownIncompatibleFeatureNames(image.featureNameTable)
    for e in image.extensions { _ = e.payload; _ = e.type }
    if let cluster0 = image.serializeCluster0() {
        var padded = cluster0
        if padded.count < image.header.clusterSize { padded += [UInt8](repeating: 0, count: image.header.clusterSize - padded.count) }
        _ = try? ImageHeader.parse(padded)
    }
    return 0
}
