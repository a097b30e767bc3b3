-- Config of the users sidecars in the demo (tandem run --config users.lua).
-- Identity (docs/security.md): only the orders service may call users; a caller without a
-- valid token is refused 401, another service 403 — before the request reaches users.py.
return {
  inbound = { allow = { "orders" } },
}
