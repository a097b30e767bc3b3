// swift-tools-version:6.1
// grpc-swift-2's own unary-call cost, measured apart from Tandem (its own package, so Tandem's
// build never compiles gRPC). `run.sh` puts it side by side with `tandem registry` (which
// serves the etcd API on NIOHTTP2 directly) and etcd, all loaded by the same grpc-swift-2 client.
import PackageDescription

let package = Package(
    name: "grpc-swift-bench",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(url: "https://github.com/grpc/grpc-swift-2", from: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport", from: "2.9.2"),
    ],
    targets: [
        .executableTarget(
            name: "GRPCSwiftBench",
            dependencies: [
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2", package: "grpc-swift-nio-transport"),
            ],
            swiftSettings: [.swiftLanguageMode(.v6)])
    ])
