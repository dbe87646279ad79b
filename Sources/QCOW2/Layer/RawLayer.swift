/// A raw file in a chain (a raw backing file, or a raw image opened directly). Every byte
/// is allocated; holes in the file (SEEK_HOLE) read as zeros, and are reported as zero,
/// as QEMU's file driver does.
final class RawLayer: Sendable {
    let path: String
    let index: Int32
    let virtualSize: UInt64

    init(path: String, index: Int32, file: FileHandle) throws {
        self.path = path
        self.index = index
        // QEMU works in 512-byte sectors: a raw file's size is rounded up, and the tail past
        // end-of-file reads as zeros.
        let size = try file.size()
        virtualSize = size > UInt64.max - 511 ? size : (size + 511) & ~511
    }

    func map(start: UInt64, end: UInt64, files: OpenFileCache, into out: inout [LayerPiece]) throws {
        let file = try files.handle(FileKey(layer: index, dataFile: false))
        var pos = start
        while pos < end {
            // SEEK_DATA fails (ENXIO) when only a hole remains; treat "unknown" as data.
            guard let data = file.nextData(from: pos) else {
                LayerPiece.append(LayerPiece(start: pos, length: end - pos, kind: .zero, host: pos, inDataFile: false), to: &out)
                return
            }
            if data > pos {
                let holeEnd = min(end, data)
                LayerPiece.append(LayerPiece(start: pos, length: holeEnd - pos, kind: .zero, host: pos, inDataFile: false), to: &out)
                pos = holeEnd
                continue
            }
            let hole = min(end, file.nextHole(from: pos) ?? end)
            let dataEnd = hole > pos ? hole : end
            LayerPiece.append(LayerPiece(start: pos, length: dataEnd - pos, kind: .data, host: pos, inDataFile: false), to: &out)
            pos = dataEnd
        }
    }
}

/// A layer of a backing chain.
enum Layer: Sendable {
    case qcow2(QCOW2Layer)
    case raw(RawLayer)

    var path: String {
        switch self {
        case let .qcow2(l): return l.path
        case let .raw(l): return l.path
        }
    }

    var virtualSize: UInt64 {
        switch self {
        case let .qcow2(l): return l.virtualSize
        case let .raw(l): return l.virtualSize
        }
    }

    var formatName: String {
        switch self {
        case .qcow2: return "qcow2"
        case .raw: return "raw"
        }
    }
}
