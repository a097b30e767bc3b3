return {
  cases = {
    { name = "answers 503 with retry-after",
      request = { path = "/user/1" },
      expect = { decision = "respond", status = 503, headers = { ["retry-after"] = "120" },
                 body = '{"code":503,"message":"down for maintenance"}' } },
    { name = "health checks still pass through",
      request = { path = "/health" }, expect = { decision = "continue" } },
    { name = "off",
      config = { enabled = false }, request = { path = "/user" }, expect = { decision = "continue" } },
  },
}
