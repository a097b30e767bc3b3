-- request-log: the seed's request-logging middleware — one line per finished request with
-- method, path, status, time, attempts, the request id and, when the sidecar answered itself,
-- why (circuit-open, timeout, …). Failures and slow requests log at warn.
--   config = { skip_paths = { "/health" }, slow_ms = 1000 }
return {
  name = "request-log",
  config = {
    skip_paths = { type = "set", of = "string", default = { "/health" } },
    slow_ms = { type = "number", default = 1000, between = { 0, 3600000 } },
  },
  on_log = function(txn, ctx, cfg)
    local req = txn.request
    if cfg.skip_paths[req.path] then return end
    local fields = {
      method = req.method, path = req.path, status = txn.status,
      duration_ms = math.floor(txn.duration_ms * 1000 + 0.5) / 1000, attempts = txn.attempts,
      id = req:header("x-request-id") or (req.id ~= "" and req.id or nil), reason = txn.reason, caller = req.caller,
    }
    local line = string.format("%s %s -> %d in %.3fms", req.method, req.path, txn.status, txn.duration_ms)
    if txn.status >= 500 or txn.duration_ms >= cfg.slow_ms then
      tandem.log.warn(line, fields)
    else
      tandem.log.info(line, fields)
    end
  end,
}
