import Foundation
import Testing

/// Builds images with the real QEMU tools inside one directory (commands run with that
/// directory as cwd, so relative backing names are written exactly as given).
struct ImageBuilder: Sendable {
    let dir: String

    func path(_ name: String) -> String { dir + "/" + name }

    /// `qemu-img ARGS…` in `dir`; must succeed.
    @discardableResult
    func img(_ args: [String]) async throws -> String {
        try await qemuImg(args, cwd: dir)
    }

    /// `qemu-img create -f FMT [-o OPTS] [-u] [-b BACKING -F BFMT] NAME SIZE`.
    func create(
        _ name: String, size: String?, format: String = "qcow2", options: String? = nil,
        backing: String? = nil, backingFormat: String = "qcow2", unsafe: Bool = false
    ) async throws {
        var args = ["create", "-q", "-f", format]
        if let options { args += ["-o", options] }
        if unsafe { args.append("-u") }
        if let backing { args += ["-b", backing, "-F", backingFormat] }
        args.append(name)
        if let size { args.append(size) }
        try await img(args)
    }

    /// One `qemu-io` process running all `commands` on `file`.
    func io(_ file: String, _ commands: [String], format: String = "qcow2") async throws {
        try await qemuIO(file, commands, format: format, cwd: dir)
    }

    func write(_ name: String, _ data: Data) throws {
        try writeFile(path(name), data)
    }

    func mkdir(_ name: String) throws {
        try QCOW2Tests.mkdir(path(name))
    }
}

/// The write/zero/discard script used for the cluster-size, compat and refcount variants:
/// full clusters, zero writes on allocated and unallocated clusters, a discard, unaligned
/// partial writes (inside one cluster and across clusters), a partial zero write over data,
/// a sub-cluster discard (a no-op in QEMU) and a write at the very end of the disk.
func standardWrites(clusterSize c: Int, size: Int) -> [String] {
    let half = size / 2
    let zeroLen = max(512, c / 2)
    return [
        "write -P 0x11 0 \(3 * c)",
        "write -z \(c) \(c)",
        "discard \(2 * c) \(c)",
        "write -P 0x22 1000 3000",
        "write -P 0x33 \(3 * c + 100) 5000",
        "write -z \(4 * c + 512) 1024",
        "write -P 0x55 \(half) \(c)",
        "write -z \(half + c / 4) \(zeroLen)",
        "discard \(half + c) 512",
        "write -P 0x44 \(size - 4096) 4096",
    ]
}
