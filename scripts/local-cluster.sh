#!/usr/bin/env bash
# A production-shaped llm-proxy on one machine: TWO control-plane replicas on ONE Postgres, THREE
# data planes sharing ONE Redis, nginx round-robin in front of the data planes (the stand-in for a
# Kubernetes Service), and mutual TLS between the planes. Every process is configured through the
# same environment variables as the Helm chart (DESIGN.md §3), so this exercises that configuration
# for real.
#
#   scripts/local-cluster.sh start     generate certs/secrets, start everything, wait until ready
#   scripts/local-cluster.sh status    what runs (pids, ports, /readyz)
#   scripts/local-cluster.sh stop      SIGTERM everything, wait for a clean exit
#
# Then:   set -a; . .local-cluster/cluster.env; set +a
#         llmctl connection add --name Mock --provider openai --endpoint "$MOCK_UPSTREAM_URL" --api-key sk-mock
#         (llmctl reads LLMCTL_SERVER, LLMCTL_TOKEN and LLMCTL_TLS_CA/CERT/KEY from cluster.env)
#         curl "$PROXY_URL/v1/models" -H "authorization: Bearer vk-..."
#
# Settings (environment):
#   CLUSTER_DIR            state dir: certs, secrets, per-process env files, logs, pids, cluster.env
#                          (default ./.local-cluster)
#   BIN_DIR                llm-proxy-control-plane, llm-proxy-data-plane, llmctl and
#                          llm-proxy-mock-upstream (default target/debug of this repo; build them
#                          with `cargo build --bins`)
#   CLUSTER_DATABASE_URL   Postgres for the control planes (default: a fresh database, dropped
#                          again by `stop`, created on postgres://postgres@127.0.0.1:5432; the
#                          server is CLUSTER_PG_ADMIN_URL)
#   CLUSTER_REDIS_URL      Redis for the shared buckets (default redis://127.0.0.1:6379/5, which
#                          `start` FLUSHDBs; a URL you give is never flushed)
#   CLUSTER_BASE_PORT      use ports BASE..BASE+11 instead of free ports picked at random
#   CLUSTER_BIND           listen address of every process (default 127.0.0.1; 0.0.0.0 is fine too:
#                          the admin and data-plane tokens are always set)
#   CLUSTER_MOCK_UPSTREAM  1 (default): also start llm-proxy-mock-upstream --bench, a fast OpenAI mock, and
#                          put its URL in cluster.env as MOCK_UPSTREAM_URL; 0: don't
#   CLUSTER_READY_TIMEOUT  seconds `start` waits for /readyz (default 60)
#   LLM_PROXY_DP_SHUTDOWN_GRACE_S, LLM_PROXY_RATELIMIT_FAIL_MODE, LLM_PROXY_RATELIMIT_REDIS_BUDGET_MS,
#   RUST_LOG, LLM_PROXY_LOG_FORMAT   passed to the processes when set (defaults 10, local, the
#                          binary's default, info, json)
#
# Requires: openssl, curl, psql (for the default database), redis-cli, nginx
# (`apt-get install -y nginx`; it runs from the state dir with a generated config: no system
# service, nothing written outside the state dir).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROG=local-cluster.sh

die() { echo "$PROG: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

CLUSTER_DIR=${CLUSTER_DIR:-$PWD/.local-cluster}
if [[ ! -d $CLUSTER_DIR && ${1:-} != start ]]; then
  echo "no cluster runs from $CLUSTER_DIR (no such directory)"
  [[ ${1:-} == stop ]] && exit 0
  exit 3
fi
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR=$(cd "$CLUSTER_DIR" && pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
BIN_DIR=$(cd "$BIN_DIR" 2>/dev/null && pwd || echo "$BIN_DIR")
PIDS=$CLUSTER_DIR/pids
LOGS=$CLUSTER_DIR/logs
CERTS=$CLUSTER_DIR/certs
SECRETS=$CLUSTER_DIR/secrets
ENVS=$CLUSTER_DIR/env
READY_TIMEOUT=${CLUSTER_READY_TIMEOUT:-60}

# Stop order: the load balancer first (no new traffic), then the data planes (they drain), then the
# control planes, then the mock upstream the drained requests may still have been waiting on.
ALL=(nginx dp1 dp2 dp3 cp1 cp2 mock)

# The executable each pid must run (guards against signalling a recycled pid).
expected_exe() {
  case $1 in
    cp*) echo llm-proxy-control-plane ;;
    dp*) echo llm-proxy-data-plane ;;
    nginx) echo nginx ;;
    mock) echo llm-proxy-mock-upstream ;;
  esac
}

pid_of() {
  local file=$PIDS/$1.pid pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ -d /proc/$pid ]] || return 1
  # A zombie or a recycled pid does not count.
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$(expected_exe "$1")" || return 1
  echo "$pid"
}

running_any() {
  local name
  for name in "${ALL[@]}"; do pid_of "$name" >/dev/null && return 0; done
  return 1
}

# Free TCP ports, picked at random below the kernel's ephemeral range (ports in that range are also
# handed out to outgoing connections, and a listener cannot bind a port an open connection holds),
# or CLUSTER_BASE_PORT..+11.
declare -a PICKED=()
port_free() {
  local p=$1 q
  for q in ${PICKED[@]+"${PICKED[@]}"}; do [[ $q == "$p" ]] && return 1; done
  # Any socket on the port, listening or not.
  ! ss -Htan "( sport = :$p )" 2>/dev/null | grep -q .
}
pick_port() { # VAR: sets VAR to the port
  local p low=32768 range
  if [[ -n ${CLUSTER_BASE_PORT:-} ]]; then
    p=$((CLUSTER_BASE_PORT + ${#PICKED[@]}))
    port_free "$p" || die "port $p (CLUSTER_BASE_PORT=$CLUSTER_BASE_PORT + ${#PICKED[@]}) is in use"
  else
    range=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "32768 60999")
    low=${range%%[[:space:]]*}
    ((low > 12000)) || low=32768
    for _ in $(seq 500); do
      p=$((10000 + RANDOM % (low - 10000)))
      port_free "$p" && break
    done
  fi
  PICKED+=("$p")
  printf -v "$1" '%s' "$p"
}

wait_ready() { # name url
  local name=$1 url=$2 deadline=$((SECONDS + READY_TIMEOUT))
  until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    if ! pid_of "$name" >/dev/null; then
      note "$name exited while starting; last lines of $LOGS/$name.log:"
      tail -n 20 "$LOGS/$name.log" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      note "$name not ready at $url after ${READY_TIMEOUT}s; last lines of $LOGS/$name.log:"
      tail -n 20 "$LOGS/$name.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
}

# Starts NAME in its own session with the variables of $ENVS/NAME.env (exactly as a pod gets them),
# output to $LOGS/NAME.log, pid to $PIDS/NAME.pid (the exec'd process's own pid).
launch() { # name command...
  local name=$1; shift
  : >"$PIDS/$name.pid"
  # shellcheck disable=SC2016 # expanded by the inner bash
  setsid bash -c 'set -a; [[ -f "$1" ]] && . "$1"; set +a; echo $$ >"$2"; shift 2; exec "$@"' \
    _ "$ENVS/$name.env" "$PIDS/$name.pid" "$@" \
    </dev/null >>"$LOGS/$name.log" 2>&1 &
  local deadline=$((SECONDS + 5))
  until [[ -s $PIDS/$name.pid ]]; do
    ((SECONDS < deadline)) || die "$name did not start"
    sleep 0.02
  done
}

# KEY=VALUE lines, values shell-quoted (a URL's `&` or `?` stays literal when sourced).
env_lines() {
  local kv
  for kv in "$@"; do printf '%s=%q\n' "${kv%%=*}" "${kv#*=}"; done
}

write_env() { # name, then KEY=VALUE arguments
  local name=$1; shift
  (umask 077; env_lines "$@" >"$ENVS/$name.env")
}

gen_certs() {
  # A CA, a server certificate for the control planes (SAN localhost, 127.0.0.1), a client
  # certificate for the data planes and one for llmctl (the CP's client CA turns on mTLS for every
  # gRPC client, admin included). Kept across restarts; delete certs/ to regenerate.
  [[ -s $CERTS/ca.crt && -s $CERTS/cp.crt && -s $CERTS/dp.crt && -s $CERTS/admin.crt ]] && return 0
  mkdir -p "$CERTS"
  (
    umask 077
    cd "$CERTS"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
      -keyout ca.key -out ca.crt -subj "/CN=llm-proxy local-cluster CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    leaf() { # name cn extendedKeyUsage [subjectAltName]
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
        -subj "/CN=$2" 2>/dev/null
      {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$3"
        [[ -n ${4:-} ]] && echo "subjectAltName=$4"
      } >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    leaf cp llm-proxy-control-plane serverAuth "DNS:localhost,IP:127.0.0.1"
    leaf dp llm-proxy-data-plane clientAuth
    leaf admin llmctl-admin clientAuth
    chmod 644 ./*.crt
  )
}

gen_secrets() {
  # Kept across restarts (a database you give with CLUSTER_DATABASE_URL keeps credentials
  # encrypted under this master key).
  mkdir -p "$SECRETS"
  chmod 700 "$SECRETS"
  (
    umask 077
    [[ -s $SECRETS/master.key ]] || openssl rand -base64 64 | tr -d '\n' >"$SECRETS/master.key"
    [[ -s $SECRETS/admin.token ]] || openssl rand -hex 24 >"$SECRETS/admin.token"
    [[ -s $SECRETS/dataplane.token ]] || openssl rand -hex 24 >"$SECRETS/dataplane.token"
  )
}

setup_database() {
  if [[ -n ${CLUSTER_DATABASE_URL:-} ]]; then
    DATABASE_URL=$CLUSTER_DATABASE_URL
    CREATED_DB=
    return
  fi
  command -v psql >/dev/null || die "psql not found (apt-get install -y postgresql-client), or set CLUSTER_DATABASE_URL"
  local admin=${CLUSTER_PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
  psql "$admin" -Atqc 'select 1' >/dev/null 2>&1 ||
    die "no Postgres answers at $admin: start one, or set CLUSTER_PG_ADMIN_URL / CLUSTER_DATABASE_URL"
  # One database per state dir, so that two clusters (a developer's and a test's) don't meet.
  CREATED_DB=llm_proxy_cluster_$(printf '%s' "$CLUSTER_DIR" | sha256sum | cut -c1-10)
  PG_ADMIN_URL=$admin
  # What `stop` drops.
  env_lines "CREATED_DB=$CREATED_DB" "PG_ADMIN_URL=$PG_ADMIN_URL" >"$CLUSTER_DIR/state"
  PGOPTIONS='-c client_min_messages=warning' psql "$admin" -qc "DROP DATABASE IF EXISTS $CREATED_DB WITH (FORCE)" >/dev/null
  psql "$admin" -qc "CREATE DATABASE $CREATED_DB" >/dev/null
  DATABASE_URL=${admin%/*}/$CREATED_DB
}

setup_redis() {
  if [[ -n ${CLUSTER_REDIS_URL:-} ]]; then
    REDIS_URL=$CLUSTER_REDIS_URL
    if command -v redis-cli >/dev/null && ! redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG; then
      note "warning: no Redis answers at CLUSTER_REDIS_URL; the data planes will limit in their fail mode"
    fi
  else
    REDIS_URL=redis://127.0.0.1:6379/5
    command -v redis-cli >/dev/null || die "redis-cli not found (apt-get install -y redis-tools), or set CLUSTER_REDIS_URL"
    redis-cli -u "$REDIS_URL" ping 2>/dev/null | grep -q PONG ||
      die "no Redis answers at $REDIS_URL: start one (redis-server), or set CLUSTER_REDIS_URL"
    redis-cli -u "$REDIS_URL" flushdb >/dev/null
  fi
}

write_nginx_conf() {
  mkdir -p "$CLUSTER_DIR/nginx/tmp"
  cat >"$CLUSTER_DIR/nginx/nginx.conf" <<EOF
# Generated by scripts/local-cluster.sh: the stand-in for the data planes' Kubernetes Service.
daemon off;
worker_processes 1;
pid $CLUSTER_DIR/nginx/nginx.pid;
error_log $LOGS/nginx-error.log warn;

events { worker_connections 4096; }

http {
    # upstream_addr: which data plane(s) served the request (several when nginx retried).
    log_format cluster '\$time_iso8601 \$status "\$request" upstream=\$upstream_addr '
                       'upstream_status=\$upstream_status rt=\$request_time';
    access_log $LOGS/nginx-access.log cluster;
    client_body_temp_path $CLUSTER_DIR/nginx/tmp/client_body;
    proxy_temp_path $CLUSTER_DIR/nginx/tmp/proxy;
    fastcgi_temp_path $CLUSTER_DIR/nginx/tmp/fastcgi;
    uwsgi_temp_path $CLUSTER_DIR/nginx/tmp/uwsgi;
    scgi_temp_path $CLUSTER_DIR/nginx/tmp/scgi;
    # Request bodies stay in memory (and so can be re-sent to another data plane, below).
    client_max_body_size 32m;
    client_body_buffer_size 1m;

    upstream llm_proxy_data_planes {
        server 127.0.0.1:$DP1_PORT max_fails=1 fail_timeout=5s;
        server 127.0.0.1:$DP2_PORT max_fails=1 fail_timeout=5s;
        server 127.0.0.1:$DP3_PORT max_fails=1 fail_timeout=5s;
        keepalive 64;
    }

    server {
        listen $BIND:$PROXY_PORT;

        location / {
            proxy_pass http://llm_proxy_data_planes;
            # Keep-alive connections to the data planes.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            # Retrying on another data plane is needed, and safe:
            # - needed: a draining data plane (SIGTERM) stops accepting and closes its idle
            #   kept-alive connections. nginx may already have written the next request onto such a
            #   connection when the close arrives; by default it does not re-send a POST once it was
            #   written ("non-idempotent"), and the client would get a 502 although no data plane
            #   ever processed the request. The same holds for a data plane killed outright.
            # - safe: nginx only retries when it got no response header at all ("error", "timeout";
            #   never on an HTTP status), i.e. the data plane answered nothing. The worst case is a
            #   data plane that died after forwarding the call upstream: the completion is then
            #   asked for twice (one extra upstream call and rate-limit token), never a wrong or
            #   mixed answer. Streams are not retried once their first byte was sent.
            proxy_next_upstream error timeout non_idempotent;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            # LLM answers (and streams between chunks) can take minutes.
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
            # Server-sent events: relay every chunk as it comes.
            proxy_buffering off;
        }
    }
}
EOF
}

print_urls() {
  cat <<EOF
llm-proxy local cluster is up (state in $CLUSTER_DIR):
  proxy (nginx -> 3 data planes)  $PROXY_URL
  control plane 1 (gRPC, mTLS)    $CP1_GRPC_URL   metrics $CP1_METRICS_URL
  control plane 2 (gRPC, mTLS)    $CP2_GRPC_URL   metrics $CP2_METRICS_URL
  data plane 1 (-> cp1)           $DP1_URL   metrics $DP1_METRICS_URL
  data plane 2 (-> cp2)           $DP2_URL   metrics $DP2_METRICS_URL
  data plane 3 (-> cp1)           $DP3_URL   metrics $DP3_METRICS_URL
EOF
  [[ -n ${MOCK_UPSTREAM_URL:-} ]] && echo "  mock OpenAI upstream            $MOCK_UPSTREAM_URL"
  cat <<EOF
Use it:
  set -a; . $CLUSTER_DIR/cluster.env; set +a
  $BIN_DIR/llmctl connection list     # LLMCTL_SERVER/TOKEN/TLS_* come from cluster.env
Status: CLUSTER_DIR=$CLUSTER_DIR $0 status
Stop it: CLUSTER_DIR=$CLUSTER_DIR $0 stop
EOF
}

cmd_start() {
  if running_any; then
    die "a cluster already runs from $CLUSTER_DIR (see: $0 status; stop it first)"
  fi
  command -v nginx >/dev/null ||
    die "nginx not found on PATH: install it (apt-get install -y nginx; no service needs to run)"
  command -v openssl >/dev/null || die "openssl not found (apt-get install -y openssl)"
  command -v curl >/dev/null || die "curl not found (apt-get install -y curl)"
  local exe
  for exe in llm-proxy-control-plane llm-proxy-data-plane llmctl; do
    [[ -x $BIN_DIR/$exe ]] || die "$BIN_DIR/$exe missing: build with \`cargo build --bins\` (or set BIN_DIR)"
  done
  local mock=${CLUSTER_MOCK_UPSTREAM:-1}
  if [[ $mock == 1 && ! -x $BIN_DIR/llm-proxy-mock-upstream ]]; then
    die "$BIN_DIR/llm-proxy-mock-upstream missing: build with \`cargo build --bins\` (or CLUSTER_MOCK_UPSTREAM=0)"
  fi

  rm -rf "$PIDS" "$LOGS" "$ENVS" "$CLUSTER_DIR/nginx" "$CLUSTER_DIR/cluster.env" "$CLUSTER_DIR/state"
  mkdir -p "$PIDS" "$LOGS" "$ENVS"
  chmod 700 "$ENVS"
  # From here on, a failed start stops what it started (and drops the database it created).
  trap 'if [[ -z ${START_OK:-} ]]; then note "start failed; stopping what was started"; cmd_stop >/dev/null 2>&1 || true; fi' EXIT
  gen_certs
  gen_secrets
  setup_database
  setup_redis

  BIND=${CLUSTER_BIND:-127.0.0.1}
  local v
  for v in PROXY_PORT CP1_PORT CP1_METRICS CP2_PORT CP2_METRICS DP1_PORT DP1_METRICS DP2_PORT DP2_METRICS \
    DP3_PORT DP3_METRICS MOCK_PORT; do
    pick_port "$v"
  done

  local admin_token dp_token log_format=${LLM_PROXY_LOG_FORMAT:-json} rust_log=${RUST_LOG:-info}
  admin_token=$(<"$SECRETS/admin.token")
  dp_token=$(<"$SECRETS/dataplane.token")

  MOCK_UPSTREAM_URL=
  if [[ $mock == 1 ]]; then
    MOCK_UPSTREAM_URL=http://127.0.0.1:$MOCK_PORT
    write_env mock
    launch mock "$BIN_DIR/llm-proxy-mock-upstream" "127.0.0.1:$MOCK_PORT" --bench
  fi

  local n port metrics
  for n in 1 2; do
    port=CP${n}_PORT; metrics=CP${n}_METRICS
    write_env "cp$n" \
      "DATABASE_URL=$DATABASE_URL" \
      "LLM_PROXY_MASTER_KEY_FILE=$SECRETS/master.key" \
      "LLM_PROXY_ADMIN_TOKEN=$admin_token" \
      "LLM_PROXY_DATAPLANE_TOKEN=$dp_token" \
      "LLM_PROXY_CP_LISTEN=$BIND:${!port}" \
      "LLM_PROXY_CP_METRICS_LISTEN=$BIND:${!metrics}" \
      "LLM_PROXY_CP_TLS_CERT=$CERTS/cp.crt" \
      "LLM_PROXY_CP_TLS_KEY=$CERTS/cp.key" \
      "LLM_PROXY_CP_TLS_CLIENT_CA=$CERTS/ca.crt" \
      "LLM_PROXY_LOG_FORMAT=$log_format" \
      "RUST_LOG=$rust_log"
    # shellcheck disable=SC1090
    (set -a; . "$ENVS/cp$n.env"; "$BIN_DIR/llm-proxy-control-plane" check-config >/dev/null) ||
      die "cp$n: check-config refused the configuration (above)"
  done
  # Both replicas start together: their migrations race for the advisory lock, as pods do.
  launch cp1 "$BIN_DIR/llm-proxy-control-plane" serve
  launch cp2 "$BIN_DIR/llm-proxy-control-plane" serve
  wait_ready cp1 "http://127.0.0.1:$CP1_METRICS/readyz"
  wait_ready cp2 "http://127.0.0.1:$CP2_METRICS/readyz"

  local cp_port
  for n in 1 2 3; do
    port=DP${n}_PORT; metrics=DP${n}_METRICS
    # dp1 and dp3 on cp1, dp2 on cp2, as a Service would spread them.
    if [[ $n == 2 ]]; then cp_port=$CP2_PORT; else cp_port=$CP1_PORT; fi
    local extra=()
    [[ -n ${LLM_PROXY_RATELIMIT_REDIS_BUDGET_MS:-} ]] &&
      extra+=("LLM_PROXY_RATELIMIT_REDIS_BUDGET_MS=$LLM_PROXY_RATELIMIT_REDIS_BUDGET_MS")
    write_env "dp$n" \
      "LLM_PROXY_DP_LISTEN=$BIND:${!port}" \
      "LLM_PROXY_DP_METRICS_LISTEN=$BIND:${!metrics}" \
      "LLM_PROXY_CONTROL_PLANE=https://localhost:$cp_port" \
      "LLM_PROXY_DATAPLANE_TOKEN=$dp_token" \
      "LLM_PROXY_DP_TLS_CA=$CERTS/ca.crt" \
      "LLM_PROXY_DP_TLS_CERT=$CERTS/dp.crt" \
      "LLM_PROXY_DP_TLS_KEY=$CERTS/dp.key" \
      "LLM_PROXY_DP_NODE_ID=dp$n" \
      "REDIS_URL=$REDIS_URL" \
      "LLM_PROXY_RATELIMIT_FAIL_MODE=${LLM_PROXY_RATELIMIT_FAIL_MODE:-local}" \
      "LLM_PROXY_DP_SHUTDOWN_GRACE_S=${LLM_PROXY_DP_SHUTDOWN_GRACE_S:-10}" \
      "LLM_PROXY_LOG_FORMAT=$log_format" \
      "RUST_LOG=$rust_log" \
      ${extra[@]+"${extra[@]}"}
    # shellcheck disable=SC1090
    (set -a; . "$ENVS/dp$n.env"; "$BIN_DIR/llm-proxy-data-plane" --check-config >/dev/null) ||
      die "dp$n: --check-config refused the configuration (above)"
    launch "dp$n" "$BIN_DIR/llm-proxy-data-plane"
  done
  # Ready = the first snapshot arrived over the mTLS stream.
  for n in 1 2 3; do
    metrics=DP${n}_METRICS
    wait_ready "dp$n" "http://127.0.0.1:${!metrics}/readyz"
  done

  write_nginx_conf
  nginx -t -q -p "$CLUSTER_DIR/nginx" -c nginx.conf -e "$LOGS/nginx-error.log" >>"$LOGS/nginx.log" 2>&1 ||
    { tail -n 5 "$LOGS/nginx.log" >&2; die "nginx refused the generated config"; }
  write_env nginx
  launch nginx nginx -p "$CLUSTER_DIR/nginx" -c nginx.conf -e "$LOGS/nginx-error.log"
  # Through nginx to a data plane: an unknown key is a 401 from the gateway itself.
  local deadline=$((SECONDS + READY_TIMEOUT)) code
  while :; do
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$PROXY_PORT/v1/models" \
      -H 'authorization: Bearer vk-readiness-probe' || true)
    [[ $code == 401 ]] && break
    pid_of nginx >/dev/null || { tail -n 20 "$LOGS/nginx-error.log" "$LOGS/nginx.log" >&2 || true; die "nginx exited"; }
    ((SECONDS < deadline)) || die "nginx at 127.0.0.1:$PROXY_PORT did not reach a data plane (last status $code)"
    sleep 0.1
  done

  PROXY_URL=http://127.0.0.1:$PROXY_PORT
  CP1_GRPC_URL=https://localhost:$CP1_PORT; CP1_METRICS_URL=http://127.0.0.1:$CP1_METRICS
  CP2_GRPC_URL=https://localhost:$CP2_PORT; CP2_METRICS_URL=http://127.0.0.1:$CP2_METRICS
  DP1_URL=http://127.0.0.1:$DP1_PORT; DP1_METRICS_URL=http://127.0.0.1:$DP1_METRICS
  DP2_URL=http://127.0.0.1:$DP2_PORT; DP2_METRICS_URL=http://127.0.0.1:$DP2_METRICS
  DP3_URL=http://127.0.0.1:$DP3_PORT; DP3_METRICS_URL=http://127.0.0.1:$DP3_METRICS
  (
    umask 077
    {
      echo '# llm-proxy local cluster (scripts/local-cluster.sh). Holds the admin token: keep it private.'
      echo "# Load with: set -a; . $CLUSTER_DIR/cluster.env; set +a"
      env_lines \
        "CLUSTER_DIR=$CLUSTER_DIR" \
        "BIN_DIR=$BIN_DIR" \
        "PIDS_DIR=$PIDS" \
        "LOGS_DIR=$LOGS" \
        "PROXY_URL=$PROXY_URL" \
        "CP1_GRPC_URL=$CP1_GRPC_URL" \
        "CP1_METRICS_URL=$CP1_METRICS_URL" \
        "CP2_GRPC_URL=$CP2_GRPC_URL" \
        "CP2_METRICS_URL=$CP2_METRICS_URL" \
        "DP1_URL=$DP1_URL" \
        "DP1_METRICS_URL=$DP1_METRICS_URL" \
        "DP2_URL=$DP2_URL" \
        "DP2_METRICS_URL=$DP2_METRICS_URL" \
        "DP3_URL=$DP3_URL" \
        "DP3_METRICS_URL=$DP3_METRICS_URL" \
        "MOCK_UPSTREAM_URL=$MOCK_UPSTREAM_URL" \
        "ADMIN_TOKEN=$admin_token" \
        "TLS_CA=$CERTS/ca.crt" \
        "TLS_CERT=$CERTS/admin.crt" \
        "TLS_KEY=$CERTS/admin.key" \
        "LLMCTL_SERVER=$CP1_GRPC_URL" \
        "LLMCTL_TOKEN=$admin_token" \
        "LLMCTL_TLS_CA=$CERTS/ca.crt" \
        "LLMCTL_TLS_CERT=$CERTS/admin.crt" \
        "LLMCTL_TLS_KEY=$CERTS/admin.key" \
        "DATABASE_URL=$DATABASE_URL" \
        "REDIS_URL=$REDIS_URL"
    } >"$CLUSTER_DIR/cluster.env"
  )
  START_OK=1
  print_urls
}

stop_one() { # name: SIGTERM, wait (data planes drain for their grace period), SIGKILL as a last resort
  local name=$1 pid grace deadline
  pid=$(pid_of "$name") || { rm -f "$PIDS/$name.pid"; return 0; }
  case $name in
    dp*) grace=$(( $(sed -n 's/^LLM_PROXY_DP_SHUTDOWN_GRACE_S=//p' "$ENVS/$name.env" 2>/dev/null || echo 10) + 5 )) ;;
    *) grace=15 ;;
  esac
  # nginx: SIGQUIT is its graceful shutdown (SIGTERM is its fast one).
  if [[ $name == nginx ]]; then kill -QUIT "$pid" 2>/dev/null || true; else kill -TERM "$pid" 2>/dev/null || true; fi
  deadline=$((SECONDS + grace))
  while pid_of "$name" >/dev/null; do
    if ((SECONDS >= deadline)); then
      note "$name (pid $pid) still running ${grace}s after SIGTERM: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.05
  done
  echo "stopped $name (pid $pid)"
  rm -f "$PIDS/$name.pid"
}

cmd_stop() {
  local name
  stop_one nginx
  # The data planes drain in parallel (as pods do), then the control planes.
  # (Waiting for these jobs by pid: a failed start calls this with the launched processes still
  # children of this shell, and a bare `wait` would wait for them too.)
  local jobs=()
  for name in dp1 dp2 dp3; do stop_one "$name" & jobs+=($!); done
  wait "${jobs[@]}"
  jobs=()
  for name in cp1 cp2; do stop_one "$name" & jobs+=($!); done
  wait "${jobs[@]}"
  stop_one mock
  if [[ -f $CLUSTER_DIR/state ]]; then
    local CREATED_DB='' PG_ADMIN_URL=
    # shellcheck disable=SC1091
    . "$CLUSTER_DIR/state"
    if [[ -n $CREATED_DB && -n $PG_ADMIN_URL ]]; then
      psql "$PG_ADMIN_URL" -qc "DROP DATABASE IF EXISTS $CREATED_DB WITH (FORCE)" >/dev/null 2>&1 ||
        note "could not drop database $CREATED_DB"
    fi
    rm -f "$CLUSTER_DIR/state"
  fi
}

cmd_status() {
  local name pid ok=0 url
  declare -A health=()
  if [[ -f $CLUSTER_DIR/cluster.env ]]; then
    health[cp1]=$(sed -n 's/^CP1_METRICS_URL=//p' "$CLUSTER_DIR/cluster.env")
    health[cp2]=$(sed -n 's/^CP2_METRICS_URL=//p' "$CLUSTER_DIR/cluster.env")
    health[dp1]=$(sed -n 's/^DP1_METRICS_URL=//p' "$CLUSTER_DIR/cluster.env")
    health[dp2]=$(sed -n 's/^DP2_METRICS_URL=//p' "$CLUSTER_DIR/cluster.env")
    health[dp3]=$(sed -n 's/^DP3_METRICS_URL=//p' "$CLUSTER_DIR/cluster.env")
    echo "proxy: $(sed -n 's/^PROXY_URL=//p' "$CLUSTER_DIR/cluster.env")   state: $CLUSTER_DIR"
  fi
  for name in "${ALL[@]}"; do
    [[ -e $PIDS/$name.pid ]] || continue
    if pid=$(pid_of "$name"); then
      url=${health[$name]:-}
      if [[ -n $url ]]; then
        printf '%-6s running  pid %-8s readyz: %s\n' "$name" "$pid" \
          "$(curl -s --max-time 2 "$url/readyz" || echo unreachable)"
      else
        printf '%-6s running  pid %s\n' "$name" "$pid"
      fi
    else
      printf '%-6s stopped  (log: %s)\n' "$name" "$LOGS/$name.log"
      ok=3
    fi
  done
  running_any || { echo "no cluster runs from $CLUSTER_DIR"; return 3; }
  return $ok
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 start|stop|status   (settings: see the top of this script)" >&2; exit 2 ;;
esac
