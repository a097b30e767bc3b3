return {
  cases = {
    { name = "stamps the duration",
      request = { path = "/user" },
      response = { status = 200, duration_ms = 12.5 },
      expect = { decision = "continue", headers = { ["x-response-time"] = "12.500ms" } } },
    { name = "on errors too",
      request = {},
      response = { status = 503, reason = "circuit-open", duration_ms = 0.25 },
      expect = { headers = { ["x-response-time"] = "0.250ms" } } },
  },
}
