-- The seed's middleware chain (chapters 2.2 and 2.5) as Lua policies on the users service's
-- inbound side, in front of an app that has none of it. Policies run in this order for
-- on_request and on_log, in reverse for on_response. Paths are relative to this file.
return {
  inbound = {
    policies = {
      "../../policies/request-log.lua",                  -- one log line per request
      "../../policies/request-id.lua",                   -- x-request-id, kept or minted
      "../../policies/response-time.lua",                -- X-Response-Time on every answer
      { file = "../../policies/input-clean.lua",          -- trim, strip, allow-list query args
        config = { allow = { "limit", "q" }, max_length = 64 } },
      { file = "../../policies/header-rewrite.lua",       -- response header injection
        config = { response = { set = { ["x-powered-by"] = "tandem", ["x-content-type-options"] = "nosniff" },
                                remove = { "server" } } } },
      { file = "../../policies/response-cache.lua",       -- hot GETs served from a shared cache
        config = { ttl = 5 } },
    },
    -- gzip for large responses (native, not Lua): JSON over 1 KiB when the client accepts it.
    compression = { min_bytes = 1024 },
  },
}
