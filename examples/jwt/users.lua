-- The seed's JWT middleware (chapter 2.4) as sidecar config: the sidecar verifies end-user
-- tokens natively (jwt-kit) before a request reaches the app, so the app holds no JWT code.
-- GET /user and GET /user/:id stay public; GET /me and POST /user need a bearer token signed
-- with the shared HS256 secret, issued by "tandem-example" for the audience "users".
-- The verified `sub` and `name` claims reach the app as x-user-id and x-user-name; a Lua
-- policy (policies/jwt-gate.lua) decides on the claims: POST /user needs the users:write scope.
-- The secret file comes from the environment (JWT_SECRET_FILE), relative paths from this file.
local rule = {
  hmac_secret_file = env.JWT_SECRET_FILE or "dev-secret.txt",
  algorithms = { "HS256" },                -- never "none"; a token of any other alg is refused
  issuers = { "tandem-example" },
  audiences = { "users" },
  from = { "bearer" },                     -- Authorization: Bearer <token>
  skew_s = 30,
  forward_claims = { sub = "x-user-id", name = "x-user-name" },
}
return {
  inbound = {
    -- What the verified claims must say, in Lua: creating users needs the users:write scope.
    policies = {
      { file = "../../policies/jwt-gate.lua",
        config = { paths = { "/user" }, methods = { "POST" }, issuer = "tandem-example", scopes = { "users:write" },
                   forward = { sub = "x-user-id", name = "x-user-name" } } },
    },
    routes = {
      { name = "me", path = "/me", jwt = rule },
      { name = "create-user", path = "/user", methods = { "POST" }, jwt = rule },
    },
  },
}
