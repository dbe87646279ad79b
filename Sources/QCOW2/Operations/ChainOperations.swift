/// Backing-chain operations: `rebase` and `commit`, as qemu-img performs them.
public enum ChainOperations {
    /// Changes the backing file of `path`.
    ///
    /// Safe mode (default) first copies into the image every 512-byte block that the image
    /// does not allocate itself and whose content differs between the old and the new
    /// backing chain, so the guest view is unchanged; `unsafe` only rewrites the header
    /// (qemu-img rebase -u). An empty or nil `newBacking` removes the backing file.
    public static func rebase(path: String, newBacking: String?, newFormat: String?, unsafe: Bool,
                              format: String? = nil, secrets: EncryptionSecrets = EncryptionSecrets(),
                              progress: (@Sendable (Double) -> Void)? = nil) throws {
        let backing = (newBacking?.isEmpty ?? true) ? nil : newBacking
        var options = OpenOptions(format: format, writable: true)
        options.secrets = secrets
        options.followBackingFiles = !unsafe
        let image = try DiskImage.open(path: path, options: options)
        guard case .qcow2 = image.layers[0] else {
            throw QCOW2Error.unsupported(path: path, "only qcow2 images have a backing file")
        }
        if backing != nil && newFormat == nil {
            throw QCOW2Error.invalidArgument("a backing format (-F) is required with -b")
        }
        if !unsafe {
            var newChain: DiskImage?
            if let backing {
                var newOptions = OpenOptions(format: newFormat)
                newOptions.secrets = secrets.below(1)
                newChain = try DiskImage.open(path: Paths.resolve(backing, relativeTo: path), options: newOptions)
            }
            try copyDifferences(image: image, newChain: newChain, progress: progress)
        }
        try image.setBacking(name: backing, format: backing == nil ? nil : newFormat)
        try image.close()
    }

    private static func copyDifferences(image: DiskImage, newChain: DiskImage?, progress: (@Sendable (Double) -> Void)?) throws {
        let size = image.virtualSize
        let oldBackingSize = image.chain.count > 1 ? image.chain[1].virtualSize : 0
        let chunk: UInt64 = 2 << 20
        let old = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunk), alignment: 4096)
        let new = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunk), alignment: 4096)
        defer {
            old.deallocate()
            new.deallocate()
        }
        for e in try image.allocationMap(offset: 0, length: size) where !(e.present && e.depth == 0) {
            var pos = e.start
            while pos < e.end {
                let n = Int(min(chunk, e.end - pos))
                let o = UnsafeMutableRawBufferPointer(rebasing: old[0..<n])
                let w = UnsafeMutableRawBufferPointer(rebasing: new[0..<n])
                try image.read(at: pos, into: o)
                let inside = newChain.map { pos < $0.virtualSize ? Int(min(UInt64(n), $0.virtualSize - pos)) : 0 } ?? 0
                if inside > 0, let newChain { try newChain.read(at: pos, into: UnsafeMutableRawBufferPointer(rebasing: w[0..<inside])) }
                if inside < n { UnsafeMutableRawBufferPointer(rebasing: w[inside...]).initializeMemory(as: UInt8.self, repeating: 0) }
                // Copy differing runs of 512-byte sectors.
                var i = 0
                while i < n {
                    let step = min(512, n - i)
                    if memcmp(o.baseAddress! + i, w.baseAddress! + i, step) == 0 {
                        i += step
                        continue
                    }
                    var j = i + step
                    while j < n, memcmp(o.baseAddress! + j, w.baseAddress! + j, min(512, n - j)) != 0 { j += min(512, n - j) }
                    let run = UnsafeRawBufferPointer(rebasing: o[i..<j])
                    // As qemu-img: past the end of the old backing file the old content is
                    // zeros by definition and is written as zero clusters; elsewhere as data.
                    if pos >= oldBackingSize {
                        try image.writeZeroes(at: pos + UInt64(i), length: UInt64(j - i))
                    } else {
                        try image.write(at: pos + UInt64(i), from: run)
                    }
                    i = j
                }
                pos += UInt64(n)
                progress?(Double(pos) / Double(max(size, 1)))
            }
        }
    }

    /// Writes the data of every layer above the base into the base (qemu-img commit).
    ///
    /// - Parameters:
    ///   - base: the image to commit into (default: the direct backing file).
    ///   - keepTop: leave the top image unchanged (`-d`); otherwise it is emptied. With an
    ///     explicit base the top is kept, as qemu-img does.
    public static func commit(path: String, base: String?, keepTop: Bool, format: String? = nil,
                              secrets: EncryptionSecrets = EncryptionSecrets(),
                              progress: (@Sendable (Double) -> Void)? = nil) throws {
        var topOptions = OpenOptions(format: format)
        topOptions.secrets = secrets
        let top = try DiskImage.open(path: path, options: topOptions)
        let chain = top.chain
        guard chain.count > 1 else { throw QCOW2Error.invalidArgument("\(path): image does not have a backing file") }
        var baseIndex = 1
        if let base {
            let wanted = Paths.realPath(base) ?? base
            guard let i = chain.indices.dropFirst().first(where: { (Paths.realPath(chain[$0].path) ?? chain[$0].path) == wanted }) else {
                throw QCOW2Error.invalidArgument("'\(base)' is not in the backing chain of '\(path)'")
            }
            baseIndex = i
        }
        let basePath = chain[baseIndex].path
        let baseFormat = chain[baseIndex].format
        var baseOptions = OpenOptions(format: baseFormat, writable: true)
        baseOptions.secrets = secrets.below(baseIndex)
        var baseDisk = try DiskImage.open(path: basePath, options: baseOptions)
        if baseDisk.virtualSize < top.virtualSize {
            try baseDisk.resize(to: top.virtualSize, allowShrink: false)
            try baseDisk.close()
            baseDisk = try DiskImage.open(path: basePath, options: baseOptions)
        }
        let size = top.virtualSize
        let chunk: UInt64 = 2 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(chunk), alignment: 4096)
        defer { buffer.deallocate() }
        for e in try top.allocationMap(offset: 0, length: size) where e.present && e.depth < baseIndex {
            if e.zero && !e.data {
                try baseDisk.writeZeroes(at: e.start, length: e.length, unmap: false)
                continue
            }
            var pos = e.start
            while pos < e.end {
                let n = Int(min(chunk, e.end - pos))
                let b = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
                try top.read(at: pos, into: b)
                try baseDisk.write(at: pos, from: UnsafeRawBufferPointer(b))
                pos += UInt64(n)
                progress?(Double(pos) / Double(max(size, 1)))
            }
        }
        try baseDisk.close()
        try top.close()
        if !keepTop && base == nil {
            var options = OpenOptions(format: format, writable: true)
            options.followBackingFiles = true
            options.secrets = secrets
            let emptied = try DiskImage.open(path: path, options: options)
            try emptied.makeEmpty()
            try emptied.close()
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
