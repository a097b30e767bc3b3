-- request-id: gives every request an id (x-request-id unless configured otherwise) when the
-- caller sent none, and echoes it on the response so both sides' logs can be joined.
return {
  name = "request-id",
  config = {
    header = { type = "string", default = "x-request-id" },
  },
  on_request = function(req, ctx, cfg)
    local id = req:header(cfg.header)
    if not id or id == "" or #id > 200 then
      id = string.format("%08x%08x", tandem.random_int(0, 2147483647), tandem.random_int(0, 2147483647))
      req:set_header(cfg.header, id)
    end
    ctx.request_id = id
  end,
  on_response = function(res, ctx, cfg)
    if ctx.request_id then res:set_header(cfg.header, ctx.request_id) end
  end,
}
