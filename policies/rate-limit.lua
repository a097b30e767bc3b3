-- rate-limit: a token bucket per caller service, per client address, per header value, or
-- one for the whole route. Shared by every event loop of the sidecar; 429 with Retry-After.
return {
  name = "rate-limit",
  config = {
    by = { type = "string", default = "ip", one_of = { "ip", "caller", "header", "route" } },
    header = { type = "string" },
    rate = { type = "number", required = true, between = { 0.001, 1e9 } },
    burst = { type = "number", between = { 1, 1e9 } },
  },
  init = function(cfg)
    if cfg.by == "header" and not cfg.header then error("by = \"header\" needs header = \"<name>\"") end
  end,
  on_request = function(req, ctx, cfg)
    local key
    if cfg.by == "ip" then
      key = req.remote_addr:match("^%[?(.-)%]?:%d+$") or req.remote_addr
    elseif cfg.by == "caller" then
      key = req.caller or "anonymous"
    elseif cfg.by == "header" then
      key = req:header(cfg.header) or ""
    else
      key = req.route
    end
    local ok, retry_ms, remaining = tandem.limit.token_bucket(key, cfg.rate, cfg.burst or math.max(1, cfg.rate))
    ctx.ratelimit_remaining = remaining
    if not ok then
      return tandem.respond(429, { code = 429, message = "rate limit exceeded" },
        { ["retry-after"] = math.max(1, math.ceil(retry_ms / 1000)), ["tandem-error"] = "rate-limited" })
    end
  end,
  on_response = function(res, ctx)
    if ctx.ratelimit_remaining then res:set_header("x-ratelimit-remaining", ctx.ratelimit_remaining) end
  end,
}
