// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "swift-qcow2",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "QCOW2", targets: ["QCOW2"]),
        .library(name: "QCOW2Format", targets: ["QCOW2Format"]),
        .library(name: "NBDServer", targets: ["NBDServer"]),
        .executable(name: "qcow2", targets: ["QCOW2Tool"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/swiftlang/swift-subprocess", from: "1.0.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.0"),
    ],
    targets: [
        // Thin C boundaries: system zlib and libzstd, and a _GNU_SOURCE shim for the
        // Linux calls Glibc's Swift module hides (fallocate, SEEK_DATA/HOLE, OFD locks).
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        .target(name: "CQCOW2System", cSettings: [.define("_GNU_SOURCE")]),
        .systemLibrary(name: "COpenSSL", pkgConfig: "libcrypto", providers: [.apt(["libssl-dev"])]),

        // Disk encryption primitives: LUKS1 header and key slots, AES-XTS/CBC with
        // plain/plain64/ESSIV IVs, PBKDF2, the AF splitter; legacy qcow AES. No qcow2 I/O.
        .target(name: "QCOW2Crypto", dependencies: ["COpenSSL"]),

        // Pure, I/O-free on-disk structures: parse with validation, serialize.
        .target(name: "QCOW2Format"),

        // The engine: layers, caches, backing chains and the chain index.
        .target(
            name: "QCOW2",
            dependencies: [
                "QCOW2Format", "QCOW2Crypto", "CZlib", "CZstd", "CQCOW2System",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),

        // The NBD server over any BlockDevice (SwiftNIO; disk I/O on its own thread pool).
        .target(
            name: "NBDServer",
            dependencies: [
                "QCOW2",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),

        // The `qcow2` command-line tool (thin: parsing and printing).
        .executableTarget(
            name: "QCOW2Tool",
            dependencies: [
                "QCOW2", "QCOW2Crypto", "NBDServer",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),

        .testTarget(name: "QCOW2FormatTests", dependencies: ["QCOW2Format"]),
        .testTarget(
            name: "QCOW2CryptoTests",
            dependencies: ["QCOW2Crypto", .product(name: "Subprocess", package: "swift-subprocess")]
        ),
        .testTarget(
            name: "NBDServerTests",
            dependencies: [
                "NBDServer", "QCOW2",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
                .product(name: "Subprocess", package: "swift-subprocess"),
            ]
        ),
        .testTarget(
            name: "QCOW2Tests",
            dependencies: [
                "QCOW2", "QCOW2Format", "QCOW2Crypto",
                .product(name: "Subprocess", package: "swift-subprocess"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
