#!/usr/bin/python3
"""The seed's gRPC UserService (chapter 3) with all four call modes, on Debian's python3-grpcio.

Messages are UTF-8 JSON bytes (no protobuf code generation needed for the demo):
  GetUser        unary             {"id":1}             -> {"id":1,"name":"Alice"}
  ListUsers      server streaming  {"count":3}          -> three users, one message each
  UploadUsers    client streaming  many {"name":...}    -> {"received":N}
  ChatStream     bidirectional     each {"text":...}    -> {"echo":...} as it arrives
  Fail           unary             {}                   -> NOT_FOUND "no such user" (+ trailing metadata)
Every call returns trailing metadata x-served-by and, when the client sent a deadline,
x-time-remaining (proves grpc-timeout crossed the sidecars).

It also serves grpc.health.v1.Health/Check (SERVING until SetHealth {"serving": false}).

usage: user_service.py server PORT
       user_service.py client HOST:PORT AUTHORITY   (prints one JSON line with every result)
       user_service.py set-health HOST:PORT true|false
"""
import json
import sys
from concurrent import futures

import grpc

SERVICE = "tandem.example.UserService"
USERS = {1: "Alice", 2: "Bob", 3: "Carol"}


def enc(o):
    return json.dumps(o).encode()


def dec(b):
    return json.loads(b.decode())


def trailing(context):
    md = [("x-served-by", "user-service")]
    remaining = context.time_remaining()
    if remaining is not None:
        md.append(("x-time-remaining", str(int(remaining))))
    context.set_trailing_metadata(md)


def get_user(req, context):
    trailing(context)
    uid = dec(req)["id"]
    return enc({"id": uid, "name": USERS.get(uid, "?")})


def list_users(req, context):
    trailing(context)
    for uid in range(1, dec(req)["count"] + 1):
        yield enc({"id": uid, "name": USERS.get(uid, "?")})


def upload_users(it, context):
    trailing(context)
    n = sum(1 for _ in it)
    return enc({"received": n})


def chat(it, context):
    trailing(context)
    for m in it:
        yield enc({"echo": dec(m)["text"]})


def fail(req, context):
    trailing(context)
    context.abort(grpc.StatusCode.NOT_FOUND, "no such user")


HEALTH = {"status": 1}  # grpc.health.v1 SERVING; NOT_SERVING is 2


def health_check(req, context):
    # HealthCheckResponse{status} hand-encoded: field 1, varint.
    return bytes([0x08, HEALTH["status"]])


def set_health(req, context):
    HEALTH["status"] = 1 if dec(req).get("serving") else 2
    return enc({"status": HEALTH["status"]})


def serve(port):
    handlers = {
        "GetUser": grpc.unary_unary_rpc_method_handler(get_user),
        "ListUsers": grpc.unary_stream_rpc_method_handler(list_users),
        "UploadUsers": grpc.stream_unary_rpc_method_handler(upload_users),
        "ChatStream": grpc.stream_stream_rpc_method_handler(chat),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "SetHealth": grpc.unary_unary_rpc_method_handler(set_health),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler(SERVICE, handlers),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(health_check)}),
    ))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: server.stop(1))
    server.wait_for_termination()


def client(target, authority):
    ch = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    out = {}
    unary = ch.unary_unary(f"/{SERVICE}/GetUser")
    resp, call = unary.with_call(enc({"id": 1}), timeout=10)
    out["unary"] = dec(resp)
    out["unary_trailers"] = dict(call.trailing_metadata())
    out["server_stream"] = [dec(m) for m in ch.unary_stream(f"/{SERVICE}/ListUsers")(enc({"count": 3}), timeout=10)]
    out["client_stream"] = dec(ch.stream_unary(f"/{SERVICE}/UploadUsers")(iter([enc({"name": n}) for n in "abcde"]), timeout=10))
    out["bidi"] = [dec(m)["echo"] for m in ch.stream_stream(f"/{SERVICE}/ChatStream")(iter([enc({"text": t}) for t in ["hi", "there", "!"]]), timeout=10)]
    try:
        ch.unary_unary(f"/{SERVICE}/Fail")(enc({}), timeout=10)
        out["error"] = "no error"
    except grpc.RpcError as e:
        out["error"] = {"code": e.code().name, "details": e.details(), "trailers": dict(e.trailing_metadata() or ())}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "set-health":
        ch = grpc.insecure_channel(sys.argv[2])
        print(dec(ch.unary_unary(f"/{SERVICE}/SetHealth")(enc({"serving": sys.argv[3] == "true"}), timeout=5)))
    else:
        client(sys.argv[2], sys.argv[3])
