return {
  config = {
    request = { set = { ["x-env"] = "prod" }, add = { via = "tandem" }, remove = { "cookie" } },
    response = { remove = { "server" }, set = { ["x-frame-options"] = "DENY" } },
  },
  cases = {
    { name = "rewrites the request and the response",
      request = { headers = { cookie = "s=1", ["x-env"] = "dev", via = "proxy-a" } },
      response = { status = 200, headers = { server = "gunicorn" } },
      expect = {
        request_headers = { cookie = false, ["x-env"] = "prod", via = "proxy-a" },
        headers = { server = false, ["x-frame-options"] = "DENY" },
      } },
    { name = "a bad header name in the config is an error at load",
      config = { request = { set = { ["bad name"] = "x" } } },
      request = {},
      expect = { error = "invalid header name" } },
    { name = "schema: lists must be lists",
      config = { request = { remove = "cookie" } },
      request = {},
      expect = { error = "request.remove: expected a list" } },
  },
}
