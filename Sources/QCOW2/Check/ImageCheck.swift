import QCOW2Format

/// Consistency check and repair of a qcow2 image, with `qemu-img check`'s categories,
/// counts and messages (format doc §14.4).
///
/// ```swift
/// let check = try ImageCheck(path: "vm.qcow2", format: nil, repair: .all)
/// var result = try check.run(repair: .all) { print($0) }
/// if result.corruptionsFixed + result.leaksFixed > 0 {
///     result = try check.run(repair: []) { print($0) }    // qemu-img's "double checking"
/// }
/// ```
///
/// The image is opened read-only with a shared lock for checking, read-write with an
/// exclusive (write) lock for repairing. Like QEMU, opening also opens the backing chain and
/// the external data file, and fails when they cannot be opened.
public final class ImageCheck {
    public let path: String
    /// "qcow2" (the only format with a check).
    public let format: String = "qcow2"
    let file: FileHandle
    let writable: Bool
    let secrets: EncryptionSecrets

    /// The image is not qcow2: qemu-img says "This image format does not support checks"
    /// (exit 63).
    public struct FormatHasNoCheck: Error, CustomStringConvertible {
        public var format: String
        public var description: String { "This image format does not support checks" }
    }

    /// Opens `path` for checking; `repair` non-empty opens it for writing. `forceShare`
    /// (qemu-img's `-U`, checks only) takes no lock, so the image may be in use.
    /// - Parameter secrets: checked against the image's LUKS key slots when given; the
    ///   check itself reads only metadata, so an encrypted image is also checked without.
    public init(path: String, format: String?, repair: CheckRepair, forceShare: Bool = false,
                secrets: EncryptionSecrets = EncryptionSecrets()) throws {
        self.secrets = secrets
        if forceShare && !repair.isEmpty {
            throw QCOW2Error.invalidArgument("force-share=on can only be used with read-only images")
        }
        self.path = path
        writable = !repair.isEmpty
        let file = try FileHandle(path: path, writable: writable)
        self.file = file
        let detected: String
        if let format {
            detected = format
        } else {
            detected = try file.read(count: 4, at: 0) == [0x51, 0x46, 0x49, 0xFB] ? "qcow2" : "raw"
        }
        switch detected {
        case "qcow2": break
        case "raw": throw FormatHasNoCheck(format: "raw")
        default: throw QCOW2Error.unsupported(path: path, "Unknown driver '\(detected)'")
        }
        if !forceShare { try file.lockImage(forWriting: writable) }
        do {
            try validateOpen()
        } catch {
            file.unlockImage()
            throw error
        }
    }

    deinit { file.unlockImage() }

    /// What QEMU's open refuses even in check mode: a broken header, unknown incompatible
    /// features, encryption without a key, a backing file or data file that cannot be opened.
    private func validateOpen() throws {
        let image = try QCOW2Checker.readImageHeader(file: file, path: path, fileSize: try file.size())
        let h = image.header
        if h.cryptMethodRaw != 0 {
            // Validates the encryption header (and the secret, if one was given).
            _ = try LayerEncryption(image: image, path: path, file: file, fileSize: try file.size(),
                                    clusterSize: UInt64(h.clusterSize), passphrase: secrets.passphrase(forDepth: 0),
                                    writable: false, allowMissingSecret: true)
        }
        if h.hasExternalDataFile {
            guard let name = image.externalDataFile else {
                throw QCOW2Error.unsupported(path: path, "Could not open data file: 'data-file' is required for this image")
            }
            let dataPath = Paths.resolve(name, relativeTo: path)
            do { _ = try FileHandle(path: dataPath, writable: false) } catch {
                throw QCOW2Error.chain(path: path, "Could not open data file '\(dataPath)': \(error)")
            }
        }
        if let name = image.backingFileName {
            try ChainOpener.checkBackingName(name, image: path)
            let backingPath = Paths.resolve(name, relativeTo: path)
            var options = OpenOptions(format: image.backingFormat)
            options.probeBackingFormat = image.backingFormat == nil
            do {
                let backing = try DiskImage.open(path: backingPath, options: options)
                try backing.close()
            } catch {
                throw QCOW2Error.chain(path: path, "Could not open backing file: \(error)")
            }
        }
    }

    /// One check pass (QEMU's `bdrv_check`): reports each finding through `log` as it is
    /// found and returns the counts, or throws `CheckFailure` when the check could not
    /// complete. With `repair`, fixes what it allows; run a second pass without repair to
    /// get the state after the repair, as qemu-img does.
    public func run(repair: CheckRepair, log: @escaping (String) -> Void) throws(CheckFailure) -> CheckResult {
        let repair = writable ? repair : []
        let checker: QCOW2Checker
        do {
            checker = try QCOW2Checker(file: file, path: path, repair: repair, writable: writable, log: log)
        } catch {
            throw CheckFailure(reason: CheckStop.from(error).reason, partial: CheckResult())
        }
        return try checker.runPass()
    }

    /// Releases the image (and its lock).
    public func close() { file.unlockImage() }
}

extension QCOW2Checker {
    /// QEMU's `qcow2_co_check_locked`.
    func runPass() throws(CheckFailure) -> CheckResult {
        var result = CheckResult()
        var snapshotResult = CheckResult()
        var refcountResult = CheckResult()
        do {
            try readSnapshotTable(&snapshotResult)
        } catch {
            result.add(snapshotResult, allocationInfo: false)
            throw CheckFailure(reason: error.reason, partial: result)
        }
        do {
            try checkRefcounts(&refcountResult)
            result.add(refcountResult, allocationInfo: true)
        } catch {
            result.add(refcountResult, allocationInfo: true)
            result.add(snapshotResult, allocationInfo: false)
            throw CheckFailure(reason: error.reason, partial: result)
        }
        do {
            try fixSnapshotTable(&snapshotResult)
            result.add(snapshotResult, allocationInfo: false)
        } catch {
            result.add(snapshotResult, allocationInfo: false)
            throw CheckFailure(reason: error.reason, partial: result)
        }
        if !repair.isEmpty && result.checkErrors == 0 && result.corruptions == 0 {
            // Consistent now: clear the dirty and corrupt bits (QEMU's qcow2_mark_clean and
            // qcow2_mark_consistent).
            do {
                try setIncompatibleBits(removing: [.dirty, .corrupt])
            } catch {
                throw CheckFailure(reason: CheckStop.from(error).reason, partial: result)
            }
        } else if writable {
            try? file.sync()
        }
        return result
    }
}
