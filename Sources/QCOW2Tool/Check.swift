import ArgumentParser
import QCOW2
#if canImport(Glibc)
import Glibc
#endif

/// `qcow2 check`: qemu-img check's options, output and exit codes (0 clean, 1 the check
/// could not complete, 2 corruptions, 3 leaks only, 63 the format has no check).
struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check an image for consistency and optionally repair it (like qemu-img check).")

    enum RepairMode: String, ExpressibleByArgument {
        case leaks, all
    }

    @Option(name: .customShort("f"), help: "Image format (qcow2; raw has no check).") var format: String?
    @Option(name: .customShort("r"), help: "Repair: 'leaks' frees leaked clusters, 'all' also fixes errors.")
    var repair: RepairMode?
    @Option(name: .customLong("output"), help: "human or json.") var output: OutputFormat = .human
    @Flag(name: .customShort("q"), help: "Quiet: print nothing on standard output.") var quiet = false
    @Flag(name: .customShort("U"), help: "Force share: check without taking the image lock (not with -r).") var forceShare = false
    @OptionGroup var secret: SecretOptions
    @Argument(help: "The image file.") var path: String

    func run() throws {
        let mode: CheckRepair
        switch repair {
        case nil: mode = []
        case .leaks: mode = .leaks
        case .all: mode = .all
        }
        let check: ImageCheck
        var options = OpenOptions(format: format)
        let path: String
        do { path = try secret.apply(self.path, to: &options) } catch {
            printError("qcow2: \(error)")
            throw ExitCode(1)
        }
        do {
            check = try ImageCheck(path: path, format: options.format, repair: mode, forceShare: forceShare, secrets: options.secrets)
        } catch let error as ImageCheck.FormatHasNoCheck {
            printError("qcow2: \(error)")
            throw ExitCode(63)
        } catch {
            printError("qcow2: Could not open '\(path)': \(error)")
            throw ExitCode(1)
        }
        defer { check.close() }
        let log: (String) -> Void = { printError($0) }

        var result: CheckResult
        do {
            result = try check.run(repair: mode, log: log)
            if result.corruptionsFixed > 0 || result.leaksFixed > 0 {
                let (leaksFixed, corruptionsFixed) = (result.leaksFixed, result.corruptionsFixed)
                if output == .human && !quiet {
                    print("The following inconsistencies were found and repaired:\n\n"
                          + "    \(leaksFixed) leaked clusters\n    \(corruptionsFixed) corruptions\n\n"
                          + "Double checking the fixed image now...")
                }
                result = try check.run(repair: [], log: log)
                result.leaksFixed = leaksFixed
                result.corruptionsFixed = corruptionsFixed
            }
        } catch {
            printError("qcow2: \(error)")
            throw ExitCode(1)
        }

        if !quiet {
            switch output {
            case .human: print(Self.human(result), terminator: "")
            case .json: print(Self.json(result, filename: path, format: check.format))
            }
        }
        if result.checkErrors > 0 {
            printError("qcow2: Check failed")
            throw ExitCode(1)
        }
        if result.corruptions > 0 { throw ExitCode(2) }
        if result.leaks > 0 { throw ExitCode(3) }
    }

    /// qemu-img's `dump_human_image_check`.
    static func human(_ r: CheckResult) -> String {
        var out = ""
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            out += "No errors were found on the image.\n"
        } else {
            if r.corruptions > 0 {
                out += "\n\(r.corruptions) errors were found on the image.\n"
                    + "Data may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks > 0 {
                out += "\n\(r.leaks) leaked clusters were found on the image.\n"
                    + "This means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors > 0 {
                out += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let allocated = Double(r.allocatedClusters)
            out += "\(r.allocatedClusters)/\(r.totalClusters) = \(percent(allocated * 100 / Double(r.totalClusters)))% allocated, "
                + "\(percent(Double(r.fragmentedClusters) * 100 / allocated))% fragmented, "
                + "\(percent(Double(r.compressedClusters) * 100 / allocated))% compressed clusters\n"
        }
        if r.imageEndOffset != 0 {
            out += "Image end offset: \(r.imageEndOffset)\n"
        }
        return out
    }

    /// `%0.2f`, exactly as printf rounds it.
    static func percent(_ v: Double) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        _ = withVaList([v]) { vsnprintf(&buffer, buffer.count, "%0.2f", $0) }
        return String(cString: buffer)
    }

    /// qemu-img's JSON `ImageCheck`: optional members only when non-zero, in the order its
    /// QDict prints them.
    static func json(_ r: CheckResult, filename: String, format: String) -> String {
        var fields: [(String, JSONValue)] = []
        if r.imageEndOffset != 0 { fields.append(("image-end-offset", .int(r.imageEndOffset))) }
        if r.compressedClusters != 0 { fields.append(("compressed-clusters", .int(r.compressedClusters))) }
        if r.totalClusters != 0 { fields.append(("total-clusters", .int(r.totalClusters))) }
        if r.corruptions != 0 { fields.append(("corruptions", .int(Int64(r.corruptions)))) }
        if r.corruptionsFixed != 0 { fields.append(("corruptions-fixed", .int(Int64(r.corruptionsFixed)))) }
        fields.append(("check-errors", .int(Int64(r.checkErrors))))
        if r.leaks != 0 { fields.append(("leaks", .int(Int64(r.leaks)))) }
        if r.leaksFixed != 0 { fields.append(("leaks-fixed", .int(Int64(r.leaksFixed)))) }
        if r.allocatedClusters != 0 { fields.append(("allocated-clusters", .int(r.allocatedClusters))) }
        fields.append(("filename", .string(filename)))
        fields.append(("format", .string(format)))
        if r.fragmentedClusters != 0 { fields.append(("fragmented-clusters", .int(r.fragmentedClusters))) }
        return JSONValue.object(fields).render(indent: 0)
    }
}
