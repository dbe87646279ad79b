// libFuzzer target: LUKS1Header(parsing:areaLength:) on the start of a LUKS area (the
// bytes a qcow2 image's full-disk-encryption extension points at).
//
// Input: the LUKS area from byte 0 (header, then key material). The area length the
// header is validated against comes from bytes 592..<596 (big-endian; zero padding in
// real headers, which then means "the input's length"), capped at 16 MiB: key material
// beyond the input reads as zeros, so a seed can be truncated after slot 0's material.
//
// A parsed header must serialize to the input's 592 bytes and parse again equal. Then, when the PBKDF2
// and AF costs are small (iterations and stripes capped so one input stays within a few
// milliseconds), unlock with the seeds' passphrase "pw" (PBKDF2, key-material read and
// decryption, AF merge, digest check); if a slot opens, the payload cipher must
// round-trip a sector.
import QCOW2Crypto

private let passphrase = Array("pw".utf8)
private let maxAreaLength: UInt64 = 16 << 20
/// Total PBKDF2 iterations one unlock may cost (digest + every active slot). qemu-img's
/// (iter-time 10 ms: ~55 000) take ~0.8 s under ASan, so only the seed with 1000 + 1000
/// runs the whole unlock path.
private let maxIterations: UInt64 = 4_000
/// Total AF material (key_bytes × stripes over the active slots) one unlock may merge.
private let maxMaterial = 1 << 20

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    var areaLength = UInt64(size)
    if size >= 596 {
        let v = UInt64(bytes[592]) << 24 | UInt64(bytes[593]) << 16 | UInt64(bytes[594]) << 8 | UInt64(bytes[595])
        if v != 0 { areaLength = min(v, maxAreaLength) }
    }
    guard let header = try? LUKS1Header(parsing: bytes, areaLength: areaLength) else { return 0 }
    _ = (header.cipherName, header.cipherMode, header.hashSpec, header.uuid, header.activeKeySlots)

    let again = header.serialized()
    guard again.count == LUKS1Header.byteCount else { fatalError("serialized() is \(again.count) bytes") }
    guard let reparsed = try? LUKS1Header(parsing: again, areaLength: areaLength) else {
        fatalError("serialized() of a parsed header does not parse again: \(header)")
    }
    guard reparsed == header else { fatalError("LUKS header round trip changed it: \(header) → \(reparsed)") }
    // Every byte of the 592 is a field kept as read (strings whole, with what follows
    // their NUL), so the serialization must be the input's header exactly.
    guard again == Array(bytes[0..<LUKS1Header.byteCount]) else {
        fatalError("serialized() differs from the input header")
    }

    // Unlock only when it is cheap.
    var iterations = UInt64(header.masterKeyDigestIterations)
    var material = 0
    for i in header.activeKeySlots {
        iterations += UInt64(header.keySlots[i].iterations)
        material += header.keySlots[i].storedKeyMaterialLength(keyBytes: header.keyBytes)
    }
    guard iterations <= maxIterations, material <= maxMaterial else { return 0 }
    let read: LUKS1Header.KeyMaterialReader = { offset, length in
        // The header validated offset + length against areaLength (≤ 16 MiB).
        guard offset <= areaLength, UInt64(length) <= areaLength - offset else {
            fatalError("key material read \(offset)+\(length) outside the \(areaLength)-byte area")
        }
        var out = [UInt8](repeating: 0, count: length)
        let start = Int(offset)
        if start < bytes.count {
            let n = min(length, bytes.count - start)
            out.replaceSubrange(0..<n, with: bytes[start..<(start + n)])
        }
        return out
    }
    guard let unlocked = try? header.unlock(passphrase: passphrase, readKeyMaterial: read) else { return 0 }
    var sector = [UInt8](repeating: 0x5A, count: SectorCipher.sectorSize)
    do {
        try unlocked.cipher.encrypt(&sector, firstSector: 7)
        try unlocked.cipher.decrypt(&sector, firstSector: 7)
    } catch {
        fatalError("payload cipher of an unlocked header fails: \(error)")
    }
    guard sector == [UInt8](repeating: 0x5A, count: SectorCipher.sectorSize) else {
        fatalError("payload cipher does not round-trip a sector")
    }
    return 0
}
