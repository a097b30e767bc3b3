// swift-tools-version:6.0
import PackageDescription

// Pure cores (TandemRaft, TandemStore) import only TandemCore and swift-collections.
// Shells (TandemStorage, TandemSimulation, the CLI) sit above them. See docs/ARCHITECTURE.md.
let swiftSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny")
]

let package = Package(
    name: "Tandem",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "tandem", targets: ["tandem"]),
        .library(name: "TandemSimulation", targets: ["TandemSimulation"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-protobuf", from: "1.39.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-http2", from: "1.46.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/apple/swift-nio-extras", from: "1.35.2"),
        // jwt-kit 5.8 needs swift-crypto >= 4.1 (docs/ARCHITECTURE.md, "Identity").
        .package(url: "https://github.com/apple/swift-crypto", from: "4.5.2"),
        .package(url: "https://github.com/vapor/jwt-kit", from: "5.8.0"),
    ],
    targets: [
        .target(name: "TandemCore", swiftSettings: swiftSettings),
        .target(
            name: "TandemRaft",
            dependencies: ["TandemCore", .product(name: "DequeModule", package: "swift-collections")],
            swiftSettings: swiftSettings),
        .target(
            name: "TandemStore",
            dependencies: [
                "TandemCore", .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "HeapModule", package: "swift-collections"),
            ],
            swiftSettings: swiftSettings),
        .target(name: "TandemTraffic", dependencies: ["TandemCore"], swiftSettings: swiftSettings),
        // Service identity: tokens, proofs, key sets, replay cache, allow rules. Pure: callers
        // pass the time and the random bytes; swift-crypto only computes.
        .target(
            name: "TandemIdentity", dependencies: ["TandemCore", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: swiftSettings),
        // The sidecar's settings and the reader of its Lua config file; shared by the sidecar
        // and the mesh simulator, so both read the same files. No NIO.
        .target(
            name: "TandemConfig", dependencies: ["TandemCore", "TandemTraffic", "TandemIdentity", "TandemLua"],
            swiftSettings: swiftSettings),
        .target(name: "TandemStorage", dependencies: ["TandemCore", "TandemRaft"], swiftSettings: swiftSettings),
        .target(
            name: "TandemReplica", dependencies: ["TandemCore", "TandemRaft", "TandemStore", "TandemStorage"],
            swiftSettings: swiftSettings),
        .target(
            name: "TandemSimulation",
            dependencies: [
                "TandemCore", "TandemRaft", "TandemStore", "TandemStorage", "TandemReplica", "TandemTraffic",
                "TandemConfig", "TandemLua", "TandemIdentity",
                .product(name: "HeapModule", package: "swift-collections"),
            ],
            swiftSettings: swiftSettings),
        .target(
            name: "TandemEtcdAPI",
            dependencies: [
                "TandemCore", "TandemRaft", "TandemStore", .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            exclude: ["Generated/README.md"],
            swiftSettings: swiftSettings),
        .target(
            name: "TandemHTTP2",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            ],
            swiftSettings: swiftSettings),
        .target(
            name: "TandemRegistryServer",
            dependencies: [
                "TandemCore", "TandemRaft", "TandemStore", "TandemStorage", "TandemReplica", "TandemEtcdAPI",
                "TandemIdentity", "TandemHTTP2", .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "NIOCore", package: "swift-nio"), .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            ],
            swiftSettings: swiftSettings),
        .target(
            name: "TandemEtcdClient",
            dependencies: [
                "TandemCore", "TandemEtcdAPI", "TandemHTTP2", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ],
            swiftSettings: swiftSettings),
        .target(
            name: "TandemSidecar",
            dependencies: [
                "TandemCore", "TandemTraffic", "TandemConfig", "TandemEtcdClient", "TandemLua", "TandemIdentity",
                "TandemHTTP2", .product(name: "JWTKit", package: "jwt-kit"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"), .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "NIOHTTPCompression", package: "swift-nio-extras"),
            ],
            swiftSettings: swiftSettings),
        .systemLibrary(
            name: "CLuaJIT", pkgConfig: "luajit", providers: [.apt(["libluajit-5.1-dev"])]),
        .target(
            name: "TandemLua", dependencies: ["CLuaJIT", "TandemCore"], exclude: ["lua"], swiftSettings: swiftSettings),
        .executableTarget(
            name: "tandem",
            dependencies: [
                "TandemCore", "TandemSimulation", "TandemLua", "TandemRegistryServer", "TandemSidecar", "TandemConfig",
                "TandemStore",
                "TandemEtcdClient",
                "TandemTraffic", .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: swiftSettings),
        .executableTarget(
            name: "TandemBench",
            dependencies: [
                "TandemCore", "TandemRaft", "TandemStore", "TandemSimulation", "TandemLua", "TandemIdentity",
                "TandemEtcdClient", "TandemEtcdAPI", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings),
        .testTarget(name: "TandemRaftTests", dependencies: ["TandemRaft"], swiftSettings: swiftSettings),
        .testTarget(name: "TandemStoreTests", dependencies: ["TandemStore"], swiftSettings: swiftSettings),
        .testTarget(
            name: "TandemStorageTests", dependencies: ["TandemStorage", "TandemSimulation"],
            swiftSettings: swiftSettings),
        .testTarget(
            name: "TandemSimulationTests",
            dependencies: ["TandemSimulation", "TandemConfig", "TandemTraffic", "TandemIdentity", "TandemLua"],
            swiftSettings: swiftSettings),
        .testTarget(name: "TandemEtcdAPITests", dependencies: ["TandemEtcdAPI"], swiftSettings: swiftSettings),
        // Starts real `tandem` processes on ephemeral ports and drives them with Debian's etcdctl.
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "TandemCore", "TandemEtcdClient", .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
            ],
            exclude: ["Resources"], swiftSettings: swiftSettings),
        .testTarget(name: "TandemTrafficTests", dependencies: ["TandemTraffic"], swiftSettings: swiftSettings),
        .testTarget(
            name: "TandemSidecarTests",
            dependencies: [
                "TandemSidecar", "TandemConfig", "TandemTraffic", "TandemIdentity", "TandemLua",
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: swiftSettings),
        .testTarget(name: "TandemLuaTests", dependencies: ["TandemLua"], swiftSettings: swiftSettings),
        .testTarget(name: "TandemIdentityTests", dependencies: ["TandemIdentity"], swiftSettings: swiftSettings),
    ]
)
