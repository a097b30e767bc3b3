import NIOCore
import NIOHTTP1
import NIOPosix
import TandemCore
import TandemEtcdClient
import TandemTraffic

/// One active health check: TCP connect, or HTTP GET with a 2xx/3xx answer.
enum HealthProbe {
    struct Result: Sendable {
        var passed: Bool
        var error: String?
    }

    static func run(
        _ kind: HealthCheckConfig.Kind, host: String, port: Int, timeout: TimeAmount, loop: any EventLoop
    )
        -> EventLoopFuture<Result>
    {
        let promise = loop.makePromise(of: Result.self)
        let timer = loop.scheduleTask(in: timeout) {
            promise.succeed(Result(passed: false, error: "timed out after \(timeout.nanoseconds / 1_000_000) ms"))
        }
        promise.futureResult.whenComplete { _ in timer.cancel() }
        switch kind {
        case .grpc(let service):
            // grpc.health.v1.Health/Check over h2c: HealthCheckRequest{service} (field 1,
            // string) → HealthCheckResponse{status} (field 1, enum; SERVING = 1).
            let client = EtcdClient(endpoints: [HostPort(host: host, port: port)], loop: loop)
            client.connectTimeout = timeout
            client.callTimeout = timeout
            let name = Array(service.utf8)
            let request: [UInt8] = name.isEmpty ? [] : [0x0A] + varint(UInt64(name.count)) + name
            client.unaryBytes("/grpc.health.v1.Health/Check", request).whenComplete { r in
                client.close()
                switch r {
                case .success(let bytes):
                    let serving = bytes == [0x08, 0x01]
                    promise.succeed(Result(passed: serving, error: serving ? nil : "not SERVING (response \(bytes))"))
                case .failure(let e):
                    promise.succeed(Result(passed: false, error: "\(e)"))
                }
            }
        case .tcp:
            ClientBootstrap(group: loop).connectTimeout(timeout).connect(host: host, port: port).whenComplete { r in
                switch r {
                case .success(let ch):
                    ch.close(promise: nil)
                    promise.succeed(Result(passed: true))
                case .failure(let e):
                    promise.succeed(Result(passed: false, error: "\(e)"))
                }
            }
        case .http(let path):
            let handler = ProbeHandler(promise: promise)
            ClientBootstrap(group: loop).connectTimeout(timeout)
                .channelInitializer { ch in
                    ch.eventLoop.makeCompletedFuture {
                        try ch.pipeline.syncOperations.addHTTPClientHandlers()
                        try ch.pipeline.syncOperations.addHandler(handler)
                    }
                }
                .connect(host: host, port: port).whenComplete { r in
                    switch r {
                    case .success(let ch):
                        var h = HTTPRequestHead(version: .http1_1, method: .GET, uri: path)
                        h.headers.add(name: "host", value: "\(host):\(port)")
                        h.headers.add(name: "user-agent", value: "tandem-health-check")
                        h.headers.add(name: "connection", value: "close")
                        ch.write(HTTPClientRequestPart.head(h), promise: nil)
                        ch.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
                        promise.futureResult.whenComplete { _ in ch.close(promise: nil) }
                    case .failure(let e):
                        promise.succeed(Result(passed: false, error: "\(e)"))
                    }
                }
        }
        return promise.futureResult
    }

    static func varint(_ v: UInt64) -> [UInt8] {
        var out: [UInt8] = []
        var x = v
        repeat {
            var b = UInt8(x & 0x7F)
            x >>= 7
            if x != 0 { b |= 0x80 }
            out.append(b)
        } while x != 0
        return out
    }

    final class ProbeHandler: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = HTTPClientResponsePart
        let promise: EventLoopPromise<Result>
        init(promise: EventLoopPromise<Result>) { self.promise = promise }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            if case .head(let h) = unwrapInboundIn(data) {
                let code = Int(h.status.code)
                promise.succeed(Result(passed: (200..<400).contains(code), error: code >= 400 ? "status \(code)" : nil))
            }
        }

        func channelInactive(context: ChannelHandlerContext) {
            promise.succeed(Result(passed: false, error: "connection closed without a response"))
        }
    }
}
