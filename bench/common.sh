# Shared by the bench scripts (sourced from the repository root).

# backend_nginx DIR PORT — DIR/nginx.conf: one nginx worker answering 1 KiB of text on
# 127.0.0.1:PORT, keep-alive without limit, no access log (the backend every hop is measured to).
backend_nginx() {
  local dir=$1 port=$2 body
  body=$(head -c 1024 /dev/zero | tr '\0' 'x')
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 1; pid $dir/pid; error_log $dir/error.log; daemon off;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$port; location / { default_type text/plain; return 200 "$body"; } } }
CONF
}

# policy_chain DIR — DIR/gate.lua and DIR/policies.lua: a sidecar config whose route `backend`
# runs the policy bench's chain, a tenant gate (x-tenant must be acme or globex, else 403) and
# policies/rate-limit.lua keyed by the tenant with a limit far above any load.
policy_chain() {
  local dir=$1
  cat > "$dir/gate.lua" <<'LUA'
return {
  name = "tenant-gate",
  config = { tenants = { type = "set", of = "string", required = true } },
  on_request = function(req, ctx, cfg)
    if not cfg.tenants[req:header("x-tenant") or ""] then return tandem.deny(403, "unknown tenant") end
  end,
}
LUA
  cat > "$dir/policies.lua" <<LUA
return { routes = { { name = "backend", host = "backend", cluster = "backend", policies = {
  { file = "$dir/gate.lua", config = { tenants = { "acme", "globex" } } },
  { file = "$(pwd)/policies/rate-limit.lua", config = { by = "header", header = "x-tenant", rate = 1e9 } },
} } } }
LUA
}
