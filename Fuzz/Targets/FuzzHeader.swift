// libFuzzer target: QCOW2Header.parse on arbitrary bytes (the fixed header, v2 and v3).
// A parsed header must survive serialize → parse unchanged (the engine rewrites headers).
import QCOW2Format

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    guard let header = try? QCOW2Header.parse(bytes) else { return 0 }
    _ = header.cryptMethod
    _ = header.refcountBits
    _ = header.unknownIncompatibleFeatureNames(FeatureNameEntry.qemuDefault)
    let again = header.serialize()
    guard let reparsed = try? QCOW2Header.parse(again) else {
        fatalError("serialize() of a parsed header does not parse again: \(header)")
    }
    guard reparsed == header else { fatalError("header round trip changed it: \(header) → \(reparsed)") }
    return 0
}
