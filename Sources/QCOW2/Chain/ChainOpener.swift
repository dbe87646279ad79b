import QCOW2Format

/// Opens a backing chain iteratively (never recursively), top layer first.
///
/// Policy (see docs/SECURITY.md): relative backing names resolve against the directory of
/// the image that names them; the backing format comes from the image's header extension
/// and is never probed unless `probeBackingFormat` is set; `json:` and protocol names are
/// refused; a file that appears twice (same device and inode) is a loop; depth is capped.
enum ChainOpener {
    static func open(path: String, options: OpenOptions, files: OpenFileCache) throws -> [Layer] {
        var layers: [Layer] = []
        var seen = Set<FileIdentity>()
        var currentPath = path
        var format = options.format
        var namedBy: String?
        while true {
            let index = Int32(layers.count)
            guard layers.count < options.maxChainDepth else {
                throw QCOW2Error.chain(path: path, "backing chain is deeper than the limit of \(options.maxChainDepth) layers")
            }
            let file: FileHandle
            do {
                file = try FileHandle(path: currentPath, writable: options.writable && index == 0)
            } catch {
                if let namedBy, case let QCOW2Error.io(_, _, code)? = error as? QCOW2Error {
                    throw QCOW2Error.chain(path: namedBy, "could not open backing file '\(currentPath)': \(errnoDescription(code))")
                }
                throw error
            }
            let identity = try file.identity()
            guard seen.insert(identity).inserted else {
                throw QCOW2Error.chain(path: namedBy ?? path, "backing chain loop: '\(currentPath)' is already part of the chain")
            }
            let fmt = try format ?? detectFormat(file: file, path: currentPath)
            switch fmt {
            case "qcow2":
                let layer = try QCOW2Layer(path: currentPath, index: index, file: file, options: options)
                files.register(FileKey(layer: index, dataFile: false), path: currentPath, handle: file)
                if let dataPath = layer.dataFilePath {
                    let dataHandle: FileHandle
                    do {
                        dataHandle = try FileHandle(path: dataPath, writable: options.writable && index == 0)
                    } catch {
                        throw QCOW2Error.chain(path: currentPath, "could not open data file '\(dataPath)': \(error)")
                    }
                    files.register(FileKey(layer: index, dataFile: true), path: dataPath, handle: dataHandle)
                }
                layers.append(.qcow2(layer))
                guard options.followBackingFiles, let name = layer.image.backingFileName else { return layers }
                try checkBackingName(name, image: currentPath)
                guard let backingFormat = layer.image.backingFormat else {
                    guard options.probeBackingFormat else {
                        throw QCOW2Error.chain(path: currentPath, "backing file '\(name)' has no format recorded in the image; refusing to probe it (set the format with 'qemu-img rebase -u -F', or allow probing)")
                    }
                    format = nil
                    namedBy = currentPath
                    currentPath = Paths.resolve(name, relativeTo: currentPath)
                    continue
                }
                guard backingFormat == "qcow2" || backingFormat == "raw" else {
                    throw QCOW2Error.unsupported(path: currentPath, "backing file format '\(backingFormat)' is not supported (qcow2 and raw are)")
                }
                format = backingFormat
                namedBy = currentPath
                currentPath = Paths.resolve(name, relativeTo: currentPath)
            case "raw":
                layers.append(.raw(try RawLayer(path: currentPath, index: index, file: file)))
                files.register(FileKey(layer: index, dataFile: false), path: currentPath, handle: file)
                return layers
            default:
                throw QCOW2Error.unsupported(path: currentPath, "image format '\(fmt)' is not supported (qcow2 and raw are)")
            }
        }
    }

    /// "qcow2" when the file starts with the qcow2 magic, otherwise "raw".
    static func detectFormat(file: FileHandle, path: String) throws -> String {
        let magic = try file.read(count: 4, at: 0)
        return magic == [0x51, 0x46, 0x49, 0xFB] ? "qcow2" : "raw"
    }

    static func checkBackingName(_ name: String, image: String) throws {
        if name.isEmpty { throw QCOW2Error.chain(path: image, "backing file name is empty") }
        if name.hasPrefix("json:") {
            throw QCOW2Error.unsupported(path: image, "backing file '\(name.prefix(64))' is a json: specification, which is not supported")
        }
        if let colon = name.firstIndex(of: ":"), !name[..<colon].contains("/") {
            let proto = name[..<colon]
            if proto.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "+" || $0 == "-" }) && !proto.isEmpty {
                throw QCOW2Error.unsupported(path: image, "backing file '\(name.prefix(64))' uses protocol '\(proto)', which is not supported (only local files)")
            }
        }
        if name.utf8.contains(0) { throw QCOW2Error.chain(path: image, "backing file name contains a NUL byte") }
    }
}
