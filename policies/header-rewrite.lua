-- header-rewrite: set, add and remove request and response headers.
--   config = { request = { set = { ["x-env"] = "prod" }, add = {...}, remove = { "cookie" } },
--              response = { remove = { "server", "x-powered-by" } } }
local side = {
  type = "record",
  fields = {
    set = { type = "map", of = "string" },
    add = { type = "map", of = "string" },
    remove = { type = "array", of = "string" },
  },
}
local function apply(obj, ops)
  if not ops then return end
  for _, name in ipairs(ops.remove or {}) do obj:remove_header(name) end
  for name, value in pairs(ops.set or {}) do obj:set_header(name, value) end
  for name, value in pairs(ops.add or {}) do obj:add_header(name, value) end
end
return {
  name = "header-rewrite",
  config = { request = side, response = side },
  on_request = function(req, ctx, cfg) apply(req, cfg.request) end,
  on_response = function(res, ctx, cfg) apply(res, cfg.response) end,
}
