#!/usr/bin/env bash
# Throwaway TLS-only Postgres and Redis, started from the local binaries, to try the production URL
# forms (`sslmode=...`, `rediss://`, DESIGN §19) on one machine. Used by e2e/test_tls_services.py.
#
#   scripts/tls-services.sh start [DIR]            make the certificates, start both servers on
#                                                  free ports, write DIR/tls-services.env, return
#   scripts/tls-services.sh stop [DIR]             stop both servers and delete their data
#   scripts/tls-services.sh run [DIR] -- CMD ...   start, run CMD with the variables of
#                                                  tls-services.env exported, stop (also on failure
#                                                  or Ctrl-C); exits with CMD's status
#
# DIR (default ./.tls-services) holds certs/, the env file, logs and, unless run as root, the
# Postgres data. A `start` whose servers fail to come up stops what it started.
#
# What runs:
#   Postgres  ssl=on on 127.0.0.1:$PG_PORT; pg_hba refuses every connection without TLS. Role
#             `llmproxy` (password $PG_PASSWORD, superuser: it is a throwaway server) with database
#             `llmproxy`; role `llmproxy_cert` authenticated by its client certificate instead.
#   Redis     `redis-server --port 0 --tls-port $REDIS_PORT` (TLS only), password $REDIS_PASSWORD,
#             no client certificates required.
# Certificates (DIR/certs, P-256): ca.crt (the private CA), server.crt/.key (SAN DNS:localhost,
# IP:127.0.0.1, used by both servers), client.crt/.key (CN=llmproxy_cert), other-ca.crt (a CA that
# signed nothing here: "the wrong CA").
#
# tls-services.env (KEY=VALUE, values shell-quoted): TLS_CA, TLS_OTHER_CA, TLS_CLIENT_CERT,
# TLS_CLIENT_KEY, PG_PORT, PG_USER, PG_PASSWORD, PG_DATABASE, PG_CERT_USER, REDIS_PORT,
# REDIS_PASSWORD. For example:
#   postgres://llmproxy:$PG_PASSWORD@127.0.0.1:$PG_PORT/llmproxy?sslmode=verify-full&sslrootcert=$TLS_CA
#   rediss://:$REDIS_PASSWORD@127.0.0.1:$REDIS_PORT   with LLM_PROXY_REDIS_CA_FILE=$TLS_CA
#
# Requires: openssl, Postgres server binaries (initdb, pg_ctl: on PATH or /usr/lib/postgresql/*/bin),
# psql, redis-server built with TLS, redis-cli, ss. As root, Postgres runs as the `postgres` user.
set -euo pipefail

PROG=tls-services.sh
die() { echo "$PROG: $*" >&2; exit 1; }
note() { echo "$PROG: $*" >&2; }

cmd=${1:-}
shift || true
DIR=./.tls-services
if [[ $# -gt 0 && $1 != -- ]]; then DIR=$1; shift; fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CERTS=$DIR/certs
ENV_FILE=$DIR/tls-services.env
STATE=$DIR/state

as_postgres() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() {
  local dir
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(command -v initdb)"
    return
  fi
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]] || return 1
  echo "$dir"
}

# A free TCP port below the kernel's ephemeral range (ports in that range are also handed to
# outgoing connections), not in use by any socket and not picked before by this script.
declare -a PICKED=()
pick_port() { # VAR
  local p low range q taken
  range=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo "32768 60999")
  low=${range%%[[:space:]]*}
  ((low > 12000)) || low=32768
  for _ in $(seq 500); do
    p=$((10000 + RANDOM % (low - 10000)))
    taken=
    for q in ${PICKED[@]+"${PICKED[@]}"}; do [[ $q == "$p" ]] && taken=1; done
    [[ -z $taken ]] && ! ss -Htan "( sport = :$p )" 2>/dev/null | grep -q . && break
  done
  PICKED+=("$p")
  printf -v "$1" '%s' "$p"
}

gen_certs() {
  mkdir -p "$CERTS"
  (
    umask 077
    cd "$CERTS"
    ca() { # name cn
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -keyout "$1.key" -out "$1.crt" -subj "/CN=$2" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    }
    leaf() { # name cn extendedKeyUsage [subjectAltName]
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
        -subj "/CN=$2" 2>/dev/null
      {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$3"
        [[ -n ${4:-} ]] && echo "subjectAltName=$4"
      } >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    ca ca "llm-proxy tls-services CA"
    ca other-ca "llm-proxy tls-services other CA"
    leaf server localhost serverAuth "DNS:localhost,IP:127.0.0.1"
    leaf client llmproxy_cert clientAuth
    chmod 644 ./*.crt
  )
}

start_postgres() {
  local bin=$1 data sock
  # The postgres user must reach its data directory: as root, a directory of its own in /tmp.
  if [[ $(id -u) -eq 0 ]]; then
    PG_PARENT=$(mktemp -d "${TMPDIR:-/tmp}/llm-proxy-tls-pg.XXXXXX")
    chown postgres "$PG_PARENT"
  else
    PG_PARENT=$DIR/pg
    mkdir -p "$PG_PARENT"
  fi
  echo "PG_PARENT=$(printf '%q' "$PG_PARENT")" >>"$STATE"
  data=$PG_PARENT/data
  sock=$PG_PARENT
  as_postgres "$bin/initdb" -D "$data" -U postgres --auth=trust >/dev/null
  install -m 600 "$CERTS/server.key" "$data/server.key"
  install -m 644 "$CERTS/server.crt" "$data/server.crt"
  install -m 644 "$CERTS/ca.crt" "$data/ca.crt"
  [[ $(id -u) -eq 0 ]] && chown postgres "$data/server.key" "$data/server.crt" "$data/ca.crt"
  cat >>"$data/postgresql.conf" <<EOF
# scripts/tls-services.sh
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$sock'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_ca_file = 'ca.crt'
fsync = off
EOF
  cat >"$data/pg_hba.conf" <<EOF
# scripts/tls-services.sh: TCP only with TLS.
local     all  all            trust
hostssl   all  llmproxy_cert  127.0.0.1/32  cert
hostssl   all  all            127.0.0.1/32  scram-sha-256
hostnossl all  all            0.0.0.0/0     reject
EOF
  as_postgres "$bin/pg_ctl" -D "$data" -l "$PG_PARENT/postgres.log" -w -t 60 start >/dev/null ||
    { tail -n 20 "$PG_PARENT/postgres.log" >&2; die "postgres did not start"; }
  psql -h "$sock" -p "$PG_PORT" -U postgres -d postgres -qX -v ON_ERROR_STOP=1 >/dev/null <<EOF
CREATE ROLE llmproxy LOGIN SUPERUSER PASSWORD '$PG_PASSWORD';
CREATE ROLE llmproxy_cert LOGIN SUPERUSER;
CREATE DATABASE llmproxy OWNER llmproxy;
EOF
}

start_redis() {
  mkdir -p "$DIR/redis"
  redis-server --port 0 --tls-port "$REDIS_PORT" --bind 127.0.0.1 \
    --tls-cert-file "$CERTS/server.crt" --tls-key-file "$CERTS/server.key" \
    --tls-ca-cert-file "$CERTS/ca.crt" --tls-auth-clients no \
    --requirepass "$REDIS_PASSWORD" --save "" --appendonly no \
    --daemonize yes --pidfile "$DIR/redis/redis.pid" --dir "$DIR/redis" --logfile "$DIR/redis/redis.log"
  local deadline=$((SECONDS + 30))
  until REDISCLI_AUTH=$REDIS_PASSWORD redis-cli --tls --cacert "$CERTS/ca.crt" -h 127.0.0.1 \
      -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; do
    if ((SECONDS >= deadline)); then
      tail -n 20 "$DIR/redis/redis.log" >&2 || true
      die "redis-server did not answer over TLS on port $REDIS_PORT"
    fi
    sleep 0.1
  done
}

cmd_stop() {
  local PG_PARENT='' pid bin deadline
  # shellcheck disable=SC1090
  [[ -f $STATE ]] && . "$STATE"
  if [[ -s $DIR/redis/redis.pid ]]; then
    pid=$(<"$DIR/redis/redis.pid")
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q redis-server; then
      kill -TERM "$pid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.05; done
    fi
    rm -rf "$DIR/redis"
  fi
  if [[ -n $PG_PARENT && -d $PG_PARENT ]]; then
    if bin=$(pg_bin) && [[ -f $PG_PARENT/data/postmaster.pid ]]; then
      as_postgres "$bin/pg_ctl" -D "$PG_PARENT/data" -m fast -w stop >/dev/null 2>&1 ||
        note "pg_ctl stop failed; see $PG_PARENT/postgres.log"
    fi
    rm -rf "$PG_PARENT"
  fi
  rm -f "$STATE" "$ENV_FILE"
}

cmd_start() {
  local bin missing=()
  for tool in openssl psql redis-server redis-cli ss; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  bin=$(pg_bin) || missing+=("initdb/pg_ctl")
  ((${#missing[@]} == 0)) || die "missing: ${missing[*]}"
  [[ -f $STATE ]] && die "already started from $DIR (run: $0 stop $DIR)"
  : >"$STATE"
  # A failed start leaves nothing running.
  trap 'status=$?; if ((status != 0)); then cmd_stop; fi' EXIT
  pick_port PG_PORT
  pick_port REDIS_PORT
  PG_PASSWORD=$(openssl rand -hex 12)
  REDIS_PASSWORD=$(openssl rand -hex 12)
  gen_certs
  start_postgres "$bin"
  start_redis
  (
    umask 077
    for kv in "TLS_CA=$CERTS/ca.crt" "TLS_OTHER_CA=$CERTS/other-ca.crt" \
      "TLS_CLIENT_CERT=$CERTS/client.crt" "TLS_CLIENT_KEY=$CERTS/client.key" \
      "PG_PORT=$PG_PORT" "PG_USER=llmproxy" "PG_PASSWORD=$PG_PASSWORD" "PG_DATABASE=llmproxy" \
      "PG_CERT_USER=llmproxy_cert" "REDIS_PORT=$REDIS_PORT" "REDIS_PASSWORD=$REDIS_PASSWORD"; do
      printf '%s=%q\n' "${kv%%=*}" "${kv#*=}"
    done >"$ENV_FILE"
  )
  trap - EXIT
  echo "postgres (TLS only) on 127.0.0.1:$PG_PORT, redis (TLS only) on 127.0.0.1:$REDIS_PORT; settings in $ENV_FILE"
}

case $cmd in
  start) cmd_start ;;
  stop) cmd_stop ;;
  run)
    [[ ${1:-} == -- ]] && shift
    [[ $# -gt 0 ]] || die "usage: $0 run [DIR] -- COMMAND..."
    cmd_start >&2
    trap cmd_stop EXIT
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    set +a
    status=0
    "$@" || status=$?
    exit "$status"
    ;;
  *) echo "usage: $0 start|stop [DIR] | run [DIR] -- COMMAND...   (see the top of this script)" >&2; exit 2 ;;
esac
