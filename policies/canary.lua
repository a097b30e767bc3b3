-- canary: send some requests to another cluster, or to the endpoints of the same cluster
-- registered with some metadata (`subset`, e.g. { version = "v2" } for instances started with
-- `tandem run --meta version=v2`) — those with a header or cookie, and a percentage of the rest
-- (sticky per `sticky_header` value when given, else random).
local function hash(s)
  local h = 5381
  for i = 1, #s do h = (h * 33 + s:byte(i)) % 4294967296 end
  return h
end

return {
  name = "canary",
  config = {
    cluster = { type = "string" },
    subset = { type = "map", of = "string" },
    header = { type = "string", default = "x-canary" },
    cookie = { type = "string" },
    percent = { type = "number", default = 0, between = { 0, 100 } },
    sticky_header = { type = "string" },
  },
  init = function(cfg)
    if not cfg.cluster and not cfg.subset then error("canary: give cluster, subset or both") end
  end,
  on_request = function(req, ctx, cfg)
    local chosen = req:header(cfg.header) == "1"
    if not chosen and cfg.cookie then
      local cookies = req:header("cookie") or ""
      for part in cookies:gmatch("[^;]+") do
        local k, v = part:match("^%s*([^=]+)=(.*)$")
        if k == cfg.cookie and v == "1" then chosen = true end
      end
    end
    if not chosen and cfg.percent > 0 then
      local key = cfg.sticky_header and req:header(cfg.sticky_header)
      local roll = key and (hash(key) % 10000) / 100 or tandem.random() * 100
      chosen = roll < cfg.percent
    end
    if chosen then
      if cfg.cluster then req:set_upstream(cfg.cluster) end
      if cfg.subset then req:set_subset(cfg.subset) end
      ctx.canary = true
    end
  end,
  on_response = function(res, ctx)
    res:set_header("x-canary", ctx.canary and "1" or "0")
  end,
}
