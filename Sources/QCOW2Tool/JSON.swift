/// A tiny JSON value with qemu-img's pretty-printing (4-space indentation, keys in the
/// order given), so our `--output=json` reads like qemu-img's.
indirect enum JSONValue {
    case string(String)
    case int(Int64)
    case bool(Bool)
    case array([JSONValue])
    case object([(String, JSONValue)])

    /// Renders the value; `indent` is the number of spaces in front of its first line.
    func render(indent: Int) -> String {
        String(repeating: " ", count: indent) + body(level: indent / 4)
    }

    private func body(level: Int) -> String {
        let pad = String(repeating: "    ", count: level + 1)
        let close = String(repeating: "    ", count: level)
        switch self {
        case let .string(s): return "\"" + JSONValue.escape(s) + "\""
        case let .int(v): return String(v)
        case let .bool(b): return b ? "true" : "false"
        case let .array(items):
            if items.isEmpty { return "[]" }
            return "[\n" + items.map { pad + $0.body(level: level + 1) }.joined(separator: ",\n") + "\n" + close + "]"
        case let .object(fields):
            if fields.isEmpty { return "{}" }
            return "{\n" + fields.map { pad + "\"\(JSONValue.escape($0.0))\": " + $0.1.body(level: level + 1) }.joined(separator: ",\n") + "\n" + close + "}"
        }
    }

    /// The value as qemu-img's human output prints it.
    var plain: String {
        switch self {
        case let .string(s): return s
        case let .int(v): return String(v)
        case let .bool(b): return b ? "true" : "false"
        default: return body(level: 0)
        }
    }

    static func escape(_ s: String) -> String {
        var out = ""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\t": out += "\\t"
            case "\r": out += "\\r"
            default:
                if u.value < 0x20 {
                    let hex = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out
    }
}
