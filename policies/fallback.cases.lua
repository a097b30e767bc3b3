return {
  cases = {
    { name = "the breaker is open: the fallback answers",
      request = {}, response = { status = 503, reason = "circuit-open" },
      expect = { decision = "respond", status = 200, headers = { ["x-fallback"] = "circuit-open" },
                 body = '{"code":0,"message":"degraded","data":null}', logs = { "serving the fallback" } } },
    { name = "an upstream 503",
      request = {}, response = { status = 503 }, expect = { decision = "respond", headers = { ["x-fallback"] = "503" } } },
    { name = "a 404 is the app's answer",
      request = {}, response = { status = 404 }, expect = { decision = "continue", status = 404 } },
    { name = "a rate-limit answer is not degraded",
      request = {}, response = { status = 429, reason = "rate-limited" }, expect = { decision = "continue" } },
  },
}
