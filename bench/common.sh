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

# proxy_nginx DIR PORT BACKEND [MAIN] [HTTP] [LOCATION] — DIR/nginx.conf: nginx proxying
# 127.0.0.1:PORT to the backend on BACKEND over kept-alive HTTP/1.1 (64 idle connections).
# MAIN: main-context directives (default two workers), HTTP: extra http-level directives,
# LOCATION: directives before proxy_pass (e.g. a Lua block).
proxy_nginx() {
  local dir=$1 port=$2 backend=$3 main=${4:-"worker_processes 2;"} http=${5:-} location=${6:-}
  mkdir -p "$dir"
  cat > "$dir/nginx.conf" <<CONF
$main pid $dir/pid; error_log $dir/error.log; daemon off;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000; $http
  upstream backend { server 127.0.0.1:$backend; keepalive 64; }
  server { listen 127.0.0.1:$port;
    location / { $location proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
}

# haproxy_cfg FILE PORT BACKEND THREADS — HAProxy in HTTP mode proxying 127.0.0.1:PORT to the
# backend on BACKEND with connection reuse (`http-reuse always`).
haproxy_cfg() {
  cat > "$1" <<CONF
global
  nbthread $4
  maxconn 8000
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend fe
  bind 127.0.0.1:$2
  default_backend be
backend be
  server s1 127.0.0.1:$3
CONF
}

# cpu_ticks "PID…" — utime + stime (clock ticks) of the processes PID…, summed.
cpu_ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $t; }
