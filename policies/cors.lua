-- cors: answers CORS preflights and adds Access-Control-Allow-Origin to answers for allowed
-- origins ("*" allows any).
return {
  name = "cors",
  config = {
    origins = { type = "set", of = "string", required = true },
    methods = { type = "array", of = "string", default = { "GET", "POST", "PUT", "PATCH", "DELETE" } },
    headers = { type = "array", of = "string", default = { "authorization", "content-type" } },
    max_age = { type = "integer", default = 600, between = { 0, 86400 } },
    credentials = { type = "boolean", default = false },
  },
  on_request = function(req, ctx, cfg)
    local origin = req:header("origin")
    if not origin then return end
    local allowed = cfg.origins[origin] or cfg.origins["*"]
    if req.method == "OPTIONS" and req:header("access-control-request-method") then
      if not allowed then return tandem.deny(403, "origin not allowed") end
      return tandem.respond(204, nil, {
        ["access-control-allow-origin"] = cfg.credentials and origin or (cfg.origins["*"] and "*" or origin),
        ["access-control-allow-methods"] = table.concat(cfg.methods, ", "),
        ["access-control-allow-headers"] = table.concat(cfg.headers, ", "),
        ["access-control-max-age"] = cfg.max_age,
        ["access-control-allow-credentials"] = cfg.credentials and "true" or nil,
        vary = "origin",
      })
    end
    if allowed then ctx.cors_origin = (cfg.origins["*"] and not cfg.credentials) and "*" or origin end
  end,
  on_response = function(res, ctx, cfg)
    if not ctx.cors_origin then return end
    res:set_header("access-control-allow-origin", ctx.cors_origin)
    if cfg.credentials then res:set_header("access-control-allow-credentials", "true") end
    res:add_header("vary", "origin")
  end,
}
