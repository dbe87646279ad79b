import Synchronization

/// Identifies one file of a chain: a layer's image file or its external data file.
struct FileKey: Hashable, Sendable {
    var layer: Int32
    var dataFile: Bool
}

/// Keeps the files of a chain open under a budget, so that a chain deeper than the
/// process's file limit (`ulimit -n`) still works: files are reopened on demand and the
/// least recently used are closed. QEMU keeps every layer open and cannot open such chains.
///
/// A handle returned to a caller stays valid while the caller holds it, even if the cache
/// evicts it meanwhile (the descriptor closes when the last reference goes).
final class OpenFileCache: Sendable {
    private let cache: Mutex<LRUCache<FileKey, FileHandle>>
    private let paths: Mutex<[FileKey: String]>
    let writable: Bool

    init(maxOpenFiles: Int, writable: Bool) {
        cache = Mutex(LRUCache(budget: max(1, maxOpenFiles)))
        paths = Mutex([:])
        self.writable = writable
    }

    /// Registers the path of a file, optionally with an already-open handle.
    func register(_ key: FileKey, path: String, handle: FileHandle?) {
        paths.withLock { $0[key] = path }
        if let handle { cache.withLock { $0.insert(handle, for: key, cost: 1) } }
    }

    func path(_ key: FileKey) -> String? { paths.withLock { $0[key] } }

    func handle(_ key: FileKey) throws -> FileHandle {
        if let h = cache.withLock({ $0.value(for: key) }) { return h }
        guard let path = paths.withLock({ $0[key] }) else {
            throw QCOW2Error.invalidArgument("internal: no file registered for layer \(key.layer)")
        }
        // Only the top layer (layer 0) is ever opened for writing.
        let h = try FileHandle(path: path, writable: writable && key.layer == 0)
        cache.withLock { $0.insert(h, for: key, cost: 1) }
        return h
    }

    func closeAll() { cache.withLock { $0.removeAll() } }
}
