return {
  cases = {
    { name = "adds an id when there is none and echoes it",
      request = { path = "/user/1" },
      response = { status = 200 },
      expect = { decision = "continue", request_headers = { ["x-request-id"] = true }, headers = { ["x-request-id"] = true } } },
    { name = "keeps the caller's id",
      request = { headers = { ["x-request-id"] = "abc-123" } },
      response = { status = 200 },
      expect = { request_headers = { ["x-request-id"] = "abc-123" }, headers = { ["x-request-id"] = "abc-123" } } },
    { name = "a configured header name",
      config = { header = "x-trace" },
      request = {},
      expect = { decision = "continue", request_headers = { ["x-trace"] = true, ["x-request-id"] = false } } },
  },
}
