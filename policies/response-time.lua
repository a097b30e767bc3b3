-- response-time: the seed's X-Response-Time middleware — how long the request took through
-- the sidecar, on every answer (the upstream's or the sidecar's own fallback).
return {
  name = "response-time",
  config = {
    header = { type = "string", default = "x-response-time" },
  },
  on_response = function(res, ctx, cfg)
    res:set_header(cfg.header, string.format("%.3fms", res.duration_ms))
  end,
}
