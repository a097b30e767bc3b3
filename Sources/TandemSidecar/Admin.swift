import NIOCore
import NIOHTTP1

/// The admin listener: `/ready`, `/live`, `/metrics`, `/clusters`, `/routes`, `/config`,
/// `POST /drain`.
/// Bind it to loopback (the default).
final class AdminHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    unowned let sidecar: Sidecar
    private var head: HTTPRequestHead?

    init(sidecar: Sidecar) { self.sidecar = sidecar }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let h = head else { return }
            head = nil
            let path = String(h.uri.split(separator: "?").first ?? "")
            switch (h.method, path) {
            case (.GET, "/live"): respond(context, h, 200, "text/plain", "live\n")
            case (.GET, "/ready"):
                sidecar.isReady
                    ? respond(context, h, 200, "text/plain", "ready\n")
                    : respond(context, h, 503, "text/plain", "not ready\n")
            case (.GET, "/metrics"): respond(context, h, 200, "text/plain; version=0.0.4", sidecar.metricsText())
            case (.GET, "/clusters"): respond(context, h, 200, "application/json", sidecar.clustersJSON() + "\n")
            case (.GET, "/routes"):
                respond(context, h, 200, "application/json", sidecar.routesJSON() + "\n")
            case (.GET, "/identity"):
                respond(context, h, 200, "application/json", sidecar.identityJSON() + "\n")
            case (.GET, "/config"):
                respond(context, h, 200, "application/json", sidecar.configJSON() + "\n")
            case (.POST, "/drain"):
                _ = sidecar.drain()
                respond(context, h, 202, "text/plain", "draining\n")
            case (_, "/drain"):
                respond(context, h, 405, "application/json", #"{"code":405,"message":"use POST /drain"}"# + "\n")
            default:
                respond(
                    context, h, 404, "application/json",
                    #"{"code":404,"message":"unknown admin path; try /ready /live /metrics /clusters /routes /identity, POST /drain"}"#
                        + "\n")
            }
        }
    }

    private func respond(
        _ context: ChannelHandlerContext, _ req: HTTPRequestHead, _ status: Int, _ type: String, _ body: String
    ) {
        var headers = HTTPHeaders()
        headers.add(name: "content-type", value: type)
        headers.add(name: "content-length", value: String(body.utf8.count))
        context.write(
            wrapOutboundOut(
                .head(HTTPResponseHead(version: req.version, status: .init(statusCode: status), headers: headers))),
            promise: nil)
        var buf = context.channel.allocator.buffer(capacity: body.utf8.count)
        buf.writeString(body)
        context.write(wrapOutboundOut(.body(.byteBuffer(buf))), promise: nil)
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
    }
}
