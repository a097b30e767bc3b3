/// The policy API as authors see it: one table that generates the LuaLS definition file
/// (`tandem policy defs`, checked in as policies/tandem.d.lua) and the API reference
/// (docs/LUA.md). TandemLuaTests checks it against the running engine in both directions for
/// the `tandem` module and that every documented request/response method exists, so the
/// definitions cannot drift from the code.
public enum PolicyAPI {
    public struct Entry: Sendable {
        /// `tandem.respond`, `Request:header`, `Request.method`.
        public let path: String
        /// A LuaLS type: `fun(...)` for functions, a type name for fields.
        public let type: String
        public let doc: String
    }

    public static let classes: [(name: String, doc: String)] = [
        ("tandem.Request", "The request, in on_request (read/write) and via res.request / txn.request (read-only)."),
        ("tandem.Response", "The answer — the upstream's or the sidecar's own (reason set) — in on_response."),
        ("tandem.Transaction", "The finished exchange in on_log (read-only)."),
        ("tandem.Decision", "A value from tandem.respond/deny/redirect; returning one ends the request with it."),
        (
            "tandem.SharedDict",
            "A dict shared by every event loop of the sidecar (declare it in the policy's `shared`)."
        ),
        ("tandem.Metric", "A counter or histogram declared in init."),
    ]

    public static let entries: [Entry] = [
        // module functions
        .init(
            path: "tandem.respond",
            type: "fun(status: integer, body?: string|table, headers?: table<string, string>): tandem.Decision",
            doc: "Answer with `status`; a table body is sent as JSON. Valid in on_request and on_response."),
        .init(
            path: "tandem.deny",
            type: "fun(status?: integer, message?: string, headers?: table<string, string>): tandem.Decision",
            doc: "Refuse (default 403) with the JSON body {code, message}."),
        .init(
            path: "tandem.redirect", type: "fun(location: string, status?: integer): tandem.Decision",
            doc: "Redirect (default 302) to `location`."),
        .init(
            path: "tandem.now", type: "fun(): number",
            doc: "Epoch milliseconds, frozen for the call (virtual under simulation and tests)."),
        .init(path: "tandem.random", type: "fun(): number", doc: "A float in [0, 1) from the VM's seeded generator."),
        .init(path: "tandem.random_int", type: "fun(a: integer, b: integer): integer", doc: "An integer in [a, b]."),
        .init(
            path: "tandem.log.debug", type: "fun(message: any, fields?: table)",
            doc: "Log a line (rate-limited per policy)."),
        .init(
            path: "tandem.log.info", type: "fun(message: any, fields?: table)",
            doc: "Log a line (rate-limited per policy)."),
        .init(
            path: "tandem.log.warn", type: "fun(message: any, fields?: table)",
            doc: "Log a line (rate-limited per policy)."),
        .init(
            path: "tandem.log.error", type: "fun(message: any, fields?: table)",
            doc: "Log a line (rate-limited per policy)."),
        .init(
            path: "tandem.json.encode", type: "fun(value: any, opts?: {max_depth?: integer}): string",
            doc: "JSON text (object keys sorted)."),
        .init(
            path: "tandem.json.decode",
            type: "fun(text: string, opts?: {max_depth?: integer, max_bytes?: integer}): any",
            doc: "Parse JSON (null becomes tandem.json.null); bounded depth and size."),
        .init(path: "tandem.json.null", type: "table", doc: "The JSON null value."),
        .init(path: "tandem.base64.encode", type: "fun(s: string): string", doc: "Standard base64."),
        .init(
            path: "tandem.base64.decode", type: "fun(s: string): string?",
            doc: "Standard base64 (padding optional); nil if invalid."),
        .init(
            path: "tandem.base64.url_decode", type: "fun(s: string): string?",
            doc: "base64url (JWT segments); nil if invalid."),
        .init(
            path: "tandem.url.escape", type: "fun(s: string): string",
            doc: "Percent-encode all but unreserved characters."),
        .init(path: "tandem.url.unescape", type: "fun(s: string): string?", doc: "Decode %XX and +."),
        .init(
            path: "tandem.match.prefix", type: "fun(s: string, prefix: string): boolean",
            doc: "Plain prefix test (no patterns)."),
        .init(
            path: "tandem.match.suffix", type: "fun(s: string, suffix: string): boolean",
            doc: "Plain suffix test (no patterns)."),
        .init(
            path: "tandem.limit.token_bucket",
            type: "fun(key: string, rate: number, burst: number): boolean, integer, integer",
            doc: "Take a token: ok, ms until one is available, tokens left. Shared across event loops, per policy."),
        .init(
            path: "tandem.limit.window",
            type: "fun(key: string, limit: integer, seconds: number): boolean, integer, number",
            doc: "Fixed window: ok, remaining, seconds until reset."),
        .init(
            path: "tandem.metrics.counter", type: "fun(name: string, labels?: string[]): tandem.Metric",
            doc: "Declare (in init) a counter exported as tandem_policy_<name>."),
        .init(
            path: "tandem.metrics.histogram",
            type: "fun(name: string, labels?: string[], buckets?: number[]): tandem.Metric",
            doc: "Declare (in init) a histogram exported as tandem_policy_<name>."),
        .init(path: "tandem.shared", type: "table<string, tandem.SharedDict>", doc: "Shared dicts by name."),
        // Request
        .init(path: "Request.method", type: "string", doc: "GET, POST, …"),
        .init(path: "Request.path", type: "string", doc: "The path without the query."),
        .init(path: "Request.query", type: "string", doc: "The raw query string without '?'."),
        .init(path: "Request.authority", type: "string", doc: "The Host / :authority."),
        .init(path: "Request.remote_addr", type: "string", doc: "The downstream peer, host:port."),
        .init(path: "Request.route", type: "string", doc: "The matched route's name."),
        .init(path: "Request.side", type: "string", doc: "\"inbound\" (in front of the app) or \"outbound\"."),
        .init(path: "Request.id", type: "string", doc: "The request id (x-request-id)."),
        .init(path: "Request.caller", type: "string?", doc: "The verified calling service, if identity is on."),
        .init(
            path: "Request:header", type: "fun(self: tandem.Request, name: string): string?",
            doc: "The first value (case-insensitive name)."),
        .init(
            path: "Request:header_values", type: "fun(self: tandem.Request, name: string): string[]",
            doc: "Every value."),
        .init(
            path: "Request:headers", type: "fun(self: tandem.Request): table<string, string|string[]>",
            doc: "A copy of all headers (lower-case names)."),
        .init(
            path: "Request:set_header", type: "fun(self: tandem.Request, name: string, value: any)",
            doc: "Replace (nil removes). on_request only."),
        .init(
            path: "Request:add_header", type: "fun(self: tandem.Request, name: string, value: any)",
            doc: "Append a value. on_request only."),
        .init(
            path: "Request:remove_header", type: "fun(self: tandem.Request, name: string)",
            doc: "Remove every value. on_request only."),
        .init(
            path: "Request:query_arg", type: "fun(self: tandem.Request, name: string): string?",
            doc: "The first decoded value of a query argument."),
        .init(
            path: "Request:query_args", type: "fun(self: tandem.Request): table<string, string>",
            doc: "Decoded query arguments (first values)."),
        .init(
            path: "Request:param", type: "fun(self: tandem.Request, name: string): string?",
            doc: "A route parameter (`:id` in the route's path)."),
        .init(
            path: "Request:body", type: "fun(self: tandem.Request): string?",
            doc:
                "The body when the sidecar buffered it: HTTP/1.1 bodies up to 64 KiB; HTTP/2 ones up to 64 KiB when a policy of the route says request_body = true. Larger bodies stream and are nil."
        ),
        .init(
            path: "Request:set_path", type: "fun(self: tandem.Request, path: string)",
            doc: "Rewrite the path. on_request only."),
        .init(
            path: "Request:set_query", type: "fun(self: tandem.Request, query: string)",
            doc: "Rewrite the query. on_request only."),
        .init(
            path: "Request:set_method", type: "fun(self: tandem.Request, method: string)",
            doc: "Rewrite the method. on_request only."),
        .init(
            path: "Request:set_upstream", type: "fun(self: tandem.Request, cluster: string)",
            doc: "Send to another cluster (canary, A/B)."),
        .init(
            path: "Request:set_subset", type: "fun(self: tandem.Request, match: table<string, string>)",
            doc:
                "Only endpoints whose registered metadata (`tandem run --meta k=v`) has all these pairs, e.g. `{ version = \"v2\" }`; `{}` clears the route's. None in the subset: 503 no-healthy-endpoint."
        ),
        .init(
            path: "Request:set_timeout", type: "fun(self: tandem.Request, ms: integer)",
            doc: "This request's route timeout."),
        .init(
            path: "Request:set_retries", type: "fun(self: tandem.Request, n: integer)",
            doc: "This request's retry attempts (0–10)."),
        .init(
            path: "Request:claim", type: "fun(self: tandem.Request, name: string): any",
            doc: "A verified end-user JWT claim."),
        // Response
        .init(path: "Response.status", type: "integer", doc: "The status."),
        .init(
            path: "Response.reason", type: "string?",
            doc:
                "Why the sidecar answered itself (circuit-open, timeout, no-healthy-endpoint, …); nil for the upstream's answer."
        ),
        .init(path: "Response.upstream", type: "string?", doc: "The endpoint that answered."),
        .init(path: "Response.attempts", type: "integer", doc: "Attempts made (1 + retries)."),
        .init(path: "Response.duration_ms", type: "number", doc: "Time so far."),
        .init(path: "Response.request", type: "tandem.Request", doc: "The request (read-only)."),
        .init(
            path: "Response:header", type: "fun(self: tandem.Response, name: string): string?", doc: "The first value."),
        .init(
            path: "Response:header_values", type: "fun(self: tandem.Response, name: string): string[]",
            doc: "Every value."),
        .init(
            path: "Response:headers", type: "fun(self: tandem.Response): table<string, string|string[]>",
            doc: "A copy of all headers."),
        .init(
            path: "Response:set_header", type: "fun(self: tandem.Response, name: string, value: any)",
            doc: "Replace (nil removes)."),
        .init(
            path: "Response:add_header", type: "fun(self: tandem.Response, name: string, value: any)",
            doc: "Append a value."),
        .init(
            path: "Response:remove_header", type: "fun(self: tandem.Response, name: string)", doc: "Remove every value."
        ),
        .init(
            path: "Response:body", type: "fun(self: tandem.Response): string?",
            doc: "The body, for a policy with response_body = true (answers up to 64 KiB); else nil."
        ),
        // Transaction
        .init(path: "Transaction.status", type: "integer", doc: "The status sent."),
        .init(path: "Transaction.reason", type: "string?", doc: "The sidecar's reason for a local answer."),
        .init(path: "Transaction.upstream", type: "string?", doc: "The endpoint that answered."),
        .init(path: "Transaction.attempts", type: "integer", doc: "Attempts made."),
        .init(path: "Transaction.duration_ms", type: "number", doc: "Total time."),
        .init(path: "Transaction.request", type: "tandem.Request", doc: "The request (read-only)."),
        .init(
            path: "Transaction:header", type: "fun(self: tandem.Transaction, name: string): string?",
            doc: "A response header."),
        // SharedDict
        .init(
            path: "SharedDict:get", type: "fun(self: tandem.SharedDict, key: any): string|number|boolean|nil",
            doc: "The live value."),
        .init(
            path: "SharedDict:set",
            type:
                "fun(self: tandem.SharedDict, key: any, value: string|number|boolean, ttl?: number): boolean, string?, boolean",
            doc: "Store (ttl in seconds): ok, err, forcible (a live entry was evicted)."),
        .init(
            path: "SharedDict:add",
            type:
                "fun(self: tandem.SharedDict, key: any, value: string|number|boolean, ttl?: number): boolean, string?, boolean",
            doc: "Store only if absent: false, \"exists\" otherwise."),
        .init(
            path: "SharedDict:incr",
            type:
                "fun(self: tandem.SharedDict, key: any, delta?: number, init?: number, init_ttl?: number): number?, string?, boolean?",
            doc: "Add delta; a missing key starts at init (else nil, \"not found\")."),
        .init(path: "SharedDict:delete", type: "fun(self: tandem.SharedDict, key: any)", doc: "Remove."),
        .init(
            path: "SharedDict:ttl", type: "fun(self: tandem.SharedDict, key: any): number?, string?",
            doc: "Seconds left (0 = no expiry)."),
        .init(
            path: "SharedDict:expire", type: "fun(self: tandem.SharedDict, key: any, ttl?: number): boolean",
            doc: "Set a new TTL."),
        // Metric
        .init(
            path: "Metric:inc", type: "fun(self: tandem.Metric, n?: number, ...: string)",
            doc: "Add to a counter; label values in declared order."),
        .init(
            path: "Metric:observe", type: "fun(self: tandem.Metric, value: number, ...: string)",
            doc: "Record into a histogram."),
    ]

    /// The hooks and keys of a policy file.
    public static let policyFields: [Entry] = [
        .init(path: "name", type: "string", doc: "The policy's name (metrics, logs, errors)."),
        .init(path: "version", type: "string?", doc: "Free-form."),
        .init(path: "description", type: "string?", doc: "Free-form."),
        .init(path: "config", type: "table<string, tandem.SchemaField>?", doc: "The schema of the policy's arguments."),
        .init(path: "shared", type: "table<string, {capacity: integer}>?", doc: "Shared dicts this policy uses."),
        .init(
            path: "response_body", type: "boolean?",
            doc: "Buffer answers up to 64 KiB so on_response can read res:body() (larger ones stream, body nil)."),
        .init(
            path: "request_body", type: "boolean?",
            doc:
                "Over HTTP/2 (and gRPC), hold the request until its end, up to 64 KiB, so on_request can read req:body() (larger ones stream, body nil). HTTP/1.1 bodies up to 64 KiB are held anyway. Not for streaming gRPC calls: on_request waits for the client's last message."
        ),
        .init(
            path: "init", type: "fun(cfg: table, env: table)?",
            doc: "Once per VM and version, after the config is validated."),
        .init(
            path: "on_request", type: "fun(req: tandem.Request, ctx: table, cfg: table): tandem.Decision?",
            doc: "Before routing."),
        .init(
            path: "on_response", type: "fun(res: tandem.Response, ctx: table, cfg: table): tandem.Decision?",
            doc: "Before the answer is sent, including the sidecar's own."),
        .init(path: "on_log", type: "fun(txn: tandem.Transaction, ctx: table, cfg: table)?", doc: "After completion."),
    ]

    /// The fields of a policy's config schema (`config = { key = <field> }`).
    public static let schemaFields: [Entry] = [
        .init(
            path: "type", type: #""string"|"number"|"integer"|"boolean"|"array"|"set"|"map"|"record"|"any""#,
            doc: "The value's type; a set arrives as a table value → true."),
        .init(path: "required", type: "boolean", doc: "The argument must be given."),
        .init(path: "default", type: "any", doc: "The value when the argument is absent."),
        .init(path: "between", type: "number[]", doc: "{min, max} for numbers, inclusive."),
        .init(path: "one_of", type: "any[]", doc: "The allowed values."),
        .init(path: "of", type: "string|tandem.SchemaField", doc: "The element type of an array, set or map."),
        .init(path: "fields", type: "table<string, tandem.SchemaField>", doc: "The fields of a record."),
        .init(path: "max_length", type: "integer", doc: "The longest string, or the most elements."),
        .init(path: "description", type: "string", doc: "Free-form."),
    ]

    /// The Lua policy API reference (docs/lua-api.md), from the same tables as the definitions.
    public static func markdownReference() -> String {
        func cell(_ s: String) -> String {
            s.split(separator: "|", omittingEmptySubsequences: false).joined(separator: "\\|")
        }
        var out = """
            # Lua policy API reference

            Generated by `tandem docs lua` from TandemLua's `PolicyAPI`, the same table that generates
            the LuaLS definitions (`policies/tandem.d.lua`) and that the tests check against the running
            engine; do not edit (a test fails if this file is stale). How to write, attach and test
            policies: [LUA.md](LUA.md).

            ## A policy file

            A policy file returns one table:

            | key | type | meaning |
            |---|---|---|

            """
        for e in policyFields { out += "| `\(e.path)` | `\(cell(e.type))` | \(cell(e.doc)) |\n" }
        out +=
            "\n### Config schema fields (`config = { name = { type = … } }`)\n\n| key | type | meaning |\n|---|---|---|\n"
        for e in schemaFields { out += "| `\(e.path)` | `\(cell(e.type))` | \(cell(e.doc)) |\n" }
        out += "\n## The `tandem` module\n\n| name | type | meaning |\n|---|---|---|\n"
        for e in entries where e.path.hasPrefix("tandem.") {
            out += "| `\(e.path)` | `\(cell(e.type))` | \(cell(e.doc)) |\n"
        }
        for c in classes {
            let short = c.name.replacingOccurrences("tandem.", "")
            out += "\n## \(c.name)\n\n\(c.doc)\n\n| field or method | type | meaning |\n|---|---|---|\n"
            for e in entries where e.path.hasPrefix(short + ".") || e.path.hasPrefix(short + ":") {
                let sep = e.path.dropFirst(short.count).first == ":" ? ":" : "."
                out += "| `\(sep)\(e.path.dropFirst(short.count + 1))` | `\(cell(e.type))` | \(cell(e.doc)) |\n"
            }
        }
        return out
    }

    /// The LuaLS `---@meta` file.
    public static func luaLSDefinitions() -> String {
        var out = "---@meta\n-- Generated by `tandem policy defs` from TandemLua's PolicyAPI; do not edit.\n\n"
        for c in classes {
            out += "---\(c.doc)\n---@class \(c.name)\n"
            let short = c.name.replacingOccurrences("tandem.", "")
            for e in entries where e.path.hasPrefix(short + ".") || e.path.hasPrefix(short + ":") {
                out += "---@field \(e.path.dropFirst(short.count + 1)) \(e.type) \(e.doc)\n"
            }
            out += "\n"
        }
        out += "---A field of a policy's config schema.\n---@class tandem.SchemaField\n"
        for e in schemaFields {
            out += "---@field \(e.path)\(e.path == "type" ? "" : "?") \(e.type) \(e.doc)\n"
        }
        out += "\n---A policy file returns this table.\n---@class tandem.Policy\n"
        for e in policyFields { out += "---@field \(e.path) \(e.type) \(e.doc)\n" }
        out += "\n---@class tandem\ntandem = {}\n"
        var tables: Set<String> = []
        for e in entries where e.path.hasPrefix("tandem.") {
            let parts = e.path.split(separator: ".")
            if parts.count == 3, !tables.contains(String(parts[1])) {
                tables.insert(String(parts[1]))
                out += "tandem.\(parts[1]) = {}\n"
            }
        }
        out += "\n"
        for e in entries where e.path.hasPrefix("tandem.") {
            out += "---\(e.doc)\n---@type \(e.type)\n\(e.path) = nil\n"
        }
        return out
    }
}
