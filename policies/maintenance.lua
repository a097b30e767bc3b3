-- maintenance: answer 503 with Retry-After while a service is being worked on, except for the
-- paths that must keep working (health checks).
return {
  name = "maintenance",
  config = {
    enabled = { type = "boolean", default = true },
    allow_paths = { type = "array", of = "string", default = { "/health" } },
    retry_after = { type = "integer", default = 120, between = { 0, 86400 } },
    message = { type = "string", default = "down for maintenance" },
  },
  on_request = function(req, ctx, cfg)
    if not cfg.enabled then return end
    for _, p in ipairs(cfg.allow_paths) do
      if tandem.match.prefix(req.path, p) then return end
    end
    return tandem.respond(503, { code = 503, message = cfg.message }, { ["retry-after"] = cfg.retry_after })
  end,
}
