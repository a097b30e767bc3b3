// grpc-swift-2 (GRPCCore + the NIO HTTP/2 transport), with no protobuf code: messages are
// raw bytes, so what is measured is the gRPC stack itself.
//
//   GRPCSwiftBench serve PORT        — answers etcd's KV.Range with a fixed RangeResponse
//   GRPCSwiftBench load HOST:PORT CONCURRENCY SECONDS
//                                    — CONCURRENCY tasks making sequential unary Range calls
//                                      (serializable, key "foo") on one connection for SECONDS;
//                                      prints calls/s and p50/p99 latency
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2

struct Raw: MessageSerializer, MessageDeserializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
    func deserialize<Bytes: GRPCContiguousBytes>(_ bytes: Bytes) throws -> [UInt8] {
        bytes.withUnsafeBytes { Array($0) }
    }
}

let range = MethodDescriptor(fullyQualifiedService: "etcdserverpb.KV", method: "Range")
/// RangeRequest{key: "foo", serializable: true}.
let request: [UInt8] = [0x0A, 0x03, 0x66, 0x6F, 0x6F, 0x38, 0x01]
/// RangeResponse{header: {revision: 1}}.
let response: [UInt8] = [0x0A, 0x02, 0x18, 0x01]

struct KV: RegistrableRPCService {
    func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        router.registerHandler(forMethod: range, deserializer: Raw(), serializer: Raw()) { request, _ in
            for try await _ in request.messages {}
            return StreamingServerResponse(single: ServerResponse(message: response))
        }
    }
}

func serve(port: Int) async throws {
    let server = GRPCServer(
        transport: .http2NIOPosix(address: .ipv4(host: "127.0.0.1", port: port), transportSecurity: .plaintext),
        services: [KV()])
    try await withThrowingDiscardingTaskGroup { group in
        group.addTask { try await server.serve() }
        if let address = try await server.listeningAddress {
            print("grpc-swift-2 serving on \(address)")
            fflush(nil)
        }
    }
}

func load(host: String, port: Int, concurrency: Int, seconds: Double) async throws {
    try await withGRPCClient(
        transport: .http2NIOPosix(target: .ipv4(host: host, port: port), transportSecurity: .plaintext)
    ) { client in
        // One call first: the connection is up before the clock starts.
        _ = try await client.unary(
            request: ClientRequest(message: request), descriptor: range, serializer: Raw(), deserializer: Raw(),
            options: .defaults
        ) { try $0.message }
        let clock = ContinuousClock()
        let end = clock.now + .milliseconds(Int(seconds * 1000))
        let start = clock.now
        let (latencies, errors) = try await withThrowingTaskGroup(of: ([Int], [String]).self) { group in
            for _ in 0..<concurrency {
                group.addTask {
                    var mine: [Int] = []
                    var errors: [String] = []
                    while clock.now < end {
                        let t0 = clock.now
                        do {
                            _ = try await client.unary(
                                request: ClientRequest(message: request), descriptor: range, serializer: Raw(),
                                deserializer: Raw(), options: .defaults
                            ) { try $0.message }
                        } catch {
                            errors.append("\(error)")
                            continue
                        }
                        let d = clock.now - t0
                        mine.append(
                            Int(d.components.seconds * 1_000_000 + d.components.attoseconds / 1_000_000_000_000))
                    }
                    return (mine, errors)
                }
            }
            var all: [Int] = []
            var errors: [String] = []
            for try await part in group {
                all += part.0
                errors += part.1
            }
            return (all.sorted(), errors)
        }
        if let e = errors.first { print("errors=\(errors.count) first: \(e)") }
        let elapsed = clock.now - start
        let secs = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
        func pct(_ p: Double) -> Double {
            Double(latencies[min(latencies.count - 1, Int(Double(latencies.count) * p))]) / 1000
        }
        print(
            String(
                format: "calls=%d calls/s=%.0f p50=%.2fms p99=%.2fms", latencies.count,
                Double(latencies.count) / secs, pct(0.5), pct(0.99)))
    }
}

let args = CommandLine.arguments
switch args.count > 1 ? args[1] : "" {
case "serve" where args.count == 3:
    try await serve(port: Int(args[2])!)
case "load" where args.count == 5:
    let hp = args[2].split(separator: ":")
    try await load(host: String(hp[0]), port: Int(hp[1])!, concurrency: Int(args[3])!, seconds: Double(args[4])!)
default:
    print("usage: GRPCSwiftBench serve PORT | load HOST:PORT CONCURRENCY SECONDS")
    exit(2)
}
