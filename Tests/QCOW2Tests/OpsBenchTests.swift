import Foundation
import Testing

// `qcow2 bench -w` against `qemu-img bench -w` with the same arguments on a copy of the same
// image (twin directories). Requests run in parallel in both tools, so host offsets are not
// deterministic; the judges are the guest content, the normalised map (offsets dropped), a
// clean check and the first line qemu-img prints (what it is about to send).

struct OpsBenchCase: Sendable, CustomTestStringConvertible {
    var name: String
    var options: String? = nil
    var size = "64M"
    /// qemu-io commands run on the image before the bench (both copies).
    var prefill: [String] = ["write -P 0x11 0 8M", "write -c -P 0x12 16M 1M", "write -z 20M 1M"]
    var args: [String]
    var testDescription: String { name }

    static let all: [OpsBenchCase] = [
        OpsBenchCase(name: "-c 1000 -s 4k -S 64k", args: ["-c", "1000", "-s", "4k", "-S", "64k"]),
        OpsBenchCase(name: "-c 1000 -s 4k -S 64k on an empty image", prefill: [], args: ["-c", "1000", "-s", "4k", "-S", "64k"]),
        OpsBenchCase(name: "-c 3000 -s 4k -S 64k (wraps around the end)", size: "16M", prefill: ["write -P 0x11 0 8M", "write -c -P 0x12 9M 1M", "write -z 12M 1M"], args: ["-c", "3000", "-s", "4k", "-S", "64k"]),
        OpsBenchCase(name: "-o 1M offset", args: ["-c", "500", "-s", "4k", "-S", "64k", "-o", "1M"]),
        OpsBenchCase(name: "unaligned -s 5000 -S 7000 -o 3", args: ["-c", "400", "-s", "5000", "-S", "7000", "-o", "3"]),
        OpsBenchCase(name: "-s 64k -S 64k (whole clusters)", args: ["-c", "300", "-s", "64k", "-S", "64k"]),
        OpsBenchCase(name: "-s 128k -S 96k (overlapping requests)", size: "16M", prefill: ["write -P 0x11 0 8M", "write -c -P 0x12 9M 1M", "write -z 12M 1M"], args: ["-c", "170", "-s", "128k", "-S", "96k"]),
        OpsBenchCase(name: "512-byte clusters", options: "cluster_size=512", size: "8M",
                     prefill: ["write -P 0x11 0 1M", "write -z 2M 64k"], args: ["-c", "1000", "-s", "4k", "-S", "64k"]),
        OpsBenchCase(name: "extended_l2 subclusters", options: "extended_l2=on", args: ["-c", "1000", "-s", "1k", "-S", "64k"]),
        OpsBenchCase(name: "-d 1 (one request in flight)", args: ["-c", "200", "-s", "4k", "-S", "64k", "-d", "1"]),
        OpsBenchCase(name: "--pattern=0x5a", args: ["-c", "300", "-s", "4k", "-S", "64k", "--pattern=0x5a"]),
        OpsBenchCase(name: "-d 4 --flush-interval=7", args: ["-c", "100", "-s", "4k", "-S", "64k", "-d", "4", "--flush-interval=7"]),
        OpsBenchCase(name: "-S 0 (every request at the same offset)", args: ["-c", "50", "-s", "4k", "-S", "0", "--pattern=0x5a"]),
        OpsBenchCase(name: "compat=0.10", options: "compat=0.10", args: ["-c", "1000", "-s", "4k", "-S", "64k"]),
    ]
}

@Suite("Ops: bench -w")
struct OpsBenchTests {
    @Test("bench -w leaves the same content as qemu-img bench -w", arguments: OpsBenchCase.all)
    func bench(_ c: OpsBenchCase) async throws {
        try await withTwin("bench-" + c.name) { t in
            try await t.builder.create("img.qcow2", size: c.size, options: c.options)
            if !c.prefill.isEmpty { try await t.builder.io("img.qcow2", c.prefill) }
            try t.mirror()
            let r = try await t.both(["bench", "-w", "-f", "qcow2"] + c.args + ["img.qcow2"], timeout: 120)
            opsExpectSameStatus(r, context: c.name)
            try #require(r.qemu.succeeded, "qemu-img bench must succeed here: \(r.qemu)")
            guard r.ours.succeeded else { return }
            // Everything qemu-img prints before the timing line.
            let head = { (s: String) in s.split(separator: "\n").filter { !$0.hasPrefix("Run completed") }.joined(separator: "\n") }
            #expect(head(r.ours.stdout) == head(r.qemu.stdout), "\(c.name): printed\n\(r.ours.stdout)\nvs qemu-img\n\(r.qemu.stdout)")
            try await opsExpectSameContent(t.o("img.qcow2"), t.q("img.qcow2"), cwd: t.root, context: c.name + " (vs qemu-img bench)")
            try await opsExpectSameLayout(t.o("img.qcow2"), t.q("img.qcow2"), cwd: t.root, context: c.name)
            try await wExpectCleanCheck("img.qcow2", cwd: t.ours, context: c.name)
        }
    }

    @Test("refused like qemu-img: same exit code, image unchanged")
    func refused() async throws {
        for args in [["-c", "100", "--flush-interval=7"]] { // the interval may not be smaller than the depth (64)
            try await withTwin("bench-bad") { t in
                try await t.builder.create("img.qcow2", size: "16M")
                try t.mirror()
                let before = try readFile(t.o("img.qcow2"))
                let r = try await t.both(["bench", "-w"] + args + ["img.qcow2"])
                opsExpectSameStatus(r, context: "bench -w \(args.joined(separator: " "))")
                #expect(!r.qemu.succeeded)
                #expect(try readFile(t.o("img.qcow2")) == before, "a refused bench changed the image")
            }
        }
    }

    /// qemu-img bench wraps offsets at the image size; a request that then runs past the
    /// end fails the run ("Failed request: Input/output error", exit 1).
    @Test("a request past the end fails like qemu-img bench")
    func pastTheEnd() async throws {
        try await withTwin("bench-end") { t in
            try await t.builder.create("img.qcow2", size: "16M")
            try t.mirror()
            for args in [["-c", "200", "-s", "128k", "-S", "96k"], ["-c", "170", "-s", "128k", "-S", "96k"]] {
                let r = try await t.both(["bench"] + args + ["img.qcow2"])
                opsExpectSameStatus(r, context: "bench \(args.joined(separator: " "))")
                if !r.qemu.succeeded { #expect(r.ours.stderr.contains("Failed request"), "\(r.ours)") }
            }
        }
    }

    @Test("raw image: same content as qemu-img bench -w")
    func raw() async throws {
        try await withTwin("bench-raw") { t in
            try await t.builder.create("img.raw", size: "16M", format: "raw")
            try await t.builder.io("img.raw", ["write -P 0x11 0 16M"], format: "raw")
            try t.mirror()
            let r = try await t.both(["bench", "-w", "-f", "raw", "-c", "1000", "-s", "4k", "-S", "64k", "img.raw"])
            opsExpectSameStatus(r, context: "raw")
            #expect(try readFile(t.o("img.raw")) == readFile(t.q("img.raw")), "raw bench result differs from qemu-img's")
        }
    }

    @Test("read bench leaves the image untouched")
    func readOnly() async throws {
        try await withTwin("bench-read") { t in
            try await t.builder.create("img.qcow2", size: "16M")
            try await t.builder.io("img.qcow2", ["write -P 0x11 0 4M"])
            try t.mirror()
            let r = try await t.both(["bench", "-c", "2000", "-s", "4k", "-S", "8k", "img.qcow2"])
            opsExpectSameStatus(r, context: "read bench")
            #expect(try readFile(t.o("img.qcow2")) == readFile(t.q("img.qcow2")), "a read bench changed the image")
        }
    }
}
