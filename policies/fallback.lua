-- fallback: the seed's degradation (降级) — when the upstream is unavailable (the breaker is
-- open, no healthy endpoint, a timeout, or a 5xx), answer with a fixed fallback instead.
return {
  name = "fallback",
  config = {
    statuses = { type = "set", of = "integer", default = { 502, 503, 504 } },
    reasons = { type = "set", of = "string",
                default = { "circuit-open", "no-healthy-endpoint", "overflow", "timeout", "upstream-connect-failure",
                            "upstream-reset", "retry-budget-exhausted" } },
    status = { type = "integer", default = 200, between = { 200, 599 } },
    body = { type = "string", default = '{"code":0,"message":"degraded","data":null}' },
    content_type = { type = "string", default = "application/json" },
  },
  on_response = function(res, ctx, cfg)
    local reason = res.reason
    if (reason and cfg.reasons[reason]) or (not reason and cfg.statuses[res.status]) then
      tandem.log.warn("serving the fallback", { status = res.status, reason = reason })
      return tandem.respond(cfg.status, cfg.body,
        { ["content-type"] = cfg.content_type, ["x-fallback"] = reason or tostring(res.status) })
    end
  end,
}
