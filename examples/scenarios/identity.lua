-- Service identity without mTLS: users admits only orders.
--
-- With identity on, every sidecar attaches a short-lived Ed25519 service token bound to the
-- callee (`aud`) to its outbound requests, and every inbound side verifies it with
-- TandemIdentity — signature, issuer, audience, expiry — before its allow rules. users'
-- sidecar config says `inbound = { allow = { "orders" } }`: orders' calls go through, web's
-- are answered 403 by users' sidecar, and the app never sees them. Every attempt also carries
-- a proof of possession (`proof = true`): a MAC under the key the caller sidecar's X25519 key
-- agrees with the callee instance's (or an Ed25519 signature with `proof_kind = "signature"`),
-- checked against the token's key binding, the request and the replay cache. Tokens live 45 s here,
-- so each caller renews them every 30 s during the run.
return {
  name = "identity: users admits only orders",
  duration_s = 90,
  identity = { mesh = "shop", proof = true },
  services = {
    orders = { instances = 2, sidecar = { identity = { token_ttl_s = 45 } } },
    web = { instances = 2, sidecar = { identity = { token_ttl_s = 45 } } },
    users = { instances = 3, latency_ms = { p50 = 4, p99 = 20 }, sidecar = { inbound = { allow = { "orders" } } } },
  },
  workload = {
    { from = "orders", to = "users", path = "/user/1", rps = 25 },
    { from = "web", to = "users", path = "/user/1", rps = 5 },
  },
  expect = {
    { route = "orders->users", success_rate = 1, requests_min = 2000 },
    { route = "web->users", success_rate_max = 0, requests_min = 400 },
  },
}
