// Shared by the whole-image fuzz targets (scripts/fuzz.sh compiles it into each): the
// private temp file that receives each input.
#if canImport(Glibc)
import Glibc
#endif

/// A fresh private directory's `input.qcow2`, removed (with the directory) at exit.
func makeFuzzInputPath(_ label: String) -> String {
    var template = Array("/tmp/qcow2-fuzz-\(label)-XXXXXX".utf8CString)
    guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else { fatalError("mkdtemp failed") }
    let dir = String(cString: made)
    fuzzInputPaths.append(dir + "/input.qcow2")
    if fuzzInputPaths.count == 1 {
        atexit {
            for p in fuzzInputPaths {
                unlink(p)
                rmdir(String(p.dropLast("/input.qcow2".count)))
            }
        }
    }
    return dir + "/input.qcow2"
}

nonisolated(unsafe) private var fuzzInputPaths: [String] = []

/// Replaces the file at `path` with the fuzzer's input.
func writeFuzzInput(_ data: UnsafePointer<UInt8>, _ size: Int, to path: String) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    guard fd >= 0 else { fatalError("cannot create \(path)") }
    var written = 0
    while written < size {
        let n = write(fd, data + written, size - written)
        guard n > 0 else { fatalError("write failed") }
        written += n
    }
    close(fd)
}
