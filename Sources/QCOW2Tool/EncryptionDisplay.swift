import QCOW2

/// The `encrypt` block of `qemu-img info` (format-specific data), in qemu-img's key order.
enum EncryptionDisplay {
    static func json(_ e: EncryptionInfo) -> JSONValue {
        guard let h = e.luks else { return .object([("format", .string(e.format))]) }
        var fields: [(String, JSONValue)] = [
            ("ivgen-alg", .string(h.cipher.ivGenerator.name)),
            ("hash-alg", .string(h.hash.name)),
            ("cipher-alg", .string(h.cipher.algorithm.name)),
            ("uuid", .string(h.uuid)),
        ]
        if case .essiv(let hash) = h.cipher.ivGenerator { fields.append(("ivgen-hash-alg", .string(hash.name))) }
        fields.append(("format", .string("luks")))
        fields.append(("cipher-mode", .string(h.cipher.mode.rawValue)))
        fields.append(("slots", .array(h.keySlots.map { slot in
            var s: [(String, JSONValue)] = [("active", .bool(slot.isActive))]
            if slot.isActive { s.append(("iters", .int(Int64(slot.iterations)))) }
            s.append(("key-offset", .int(Int64(slot.keyMaterialByteOffset))))
            if slot.isActive { s.append(("stripes", .int(Int64(slot.stripes)))) }
            return .object(s)
        })))
        fields.append(("payload-offset", .int(Int64(h.payloadOffset) * 512)))
        fields.append(("master-key-iters", .int(Int64(h.masterKeyDigestIterations))))
        return .object(fields)
    }

    /// qemu-img's human rendering of a format-specific value: nested objects indented by
    /// four spaces, list items as `[i]:`, dashes in keys shown as spaces.
    static func human(key: String, value: JSONValue, indent: Int) -> [String] {
        let pad = String(repeating: " ", count: indent)
        let name = key.split(separator: "-").joined(separator: " ")
        switch value {
        case let .object(fields):
            return ["\(pad)\(name):"] + fields.flatMap { human(key: $0.0, value: $0.1, indent: indent + 4) }
        case let .array(items):
            var lines = ["\(pad)\(name):"]
            for (i, item) in items.enumerated() {
                lines.append(contentsOf: human(key: "[\(i)]", value: item, indent: indent + 4))
            }
            return lines
        default:
            return ["\(pad)\(name): \(value.plain)"]
        }
    }
}
