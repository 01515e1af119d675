#!/usr/bin/env bash
# Gateway overhead benchmark (not a test; DESIGN §15). A fast local mock upstream
# (`llm-proxy-mock-upstream --bench`, mock-upstream/src/bench.rs) is driven with oha directly, through nginx `proxy_pass`
# (the floor: keep-alive upstream, one worker) and through llm-proxy as deployed (control plane +
# data plane processes, virtual-key auth, one assignment, Redis limiter with a limit that never
# rejects): fixed rates (500 and 2000 req/s) and maximum throughput, non-streamed and streamed.
# Streaming time to first byte is measured with data-plane/examples/ttfb.rs. The same data plane
# then serves Anthropic's Messages API (`POST /v1/messages`, an `anthropic` connection to the same
# mock, passed through; target llm-proxy-messages): TTFB, the top fixed rate and maximum
# throughput, both modes, so that its CPU per request compares with the OpenAI chat rows of the
# same run; and likewise OpenAI's Responses API (`POST /v1/responses` to the same `openai`
# connection, passed through with the response id tagged; target llm-proxy-responses). Then a config-scale
# run: 100k virtual keys and 300k assignments written straight into the control plane's SQLite
# database, snapshot build/apply times, data plane memory and latency with it loaded.
# For the CPU/req ratio to nginx (issue 19): maximum-throughput OpenAI chat rows with 16 KiB and
# 128 KiB request bodies (the user message padded), nginx and the data plane in the same run, and
# a last phase with the data plane on its in-process limiter (no --redis-url), every body size.
# Every run also records the proxy's context switches and read/write syscalls (/proc); and
# data-plane/examples/allocs_per_request.rs counts heap allocations per request.
#
# The proxy under test (nginx's worker or the data plane) runs on core 0; oha, the mock and the
# TTFB client on core 1. Writes bench/RESULTS.md (see bench/README.md) and prints it.
#
#   scripts/bench.sh [SECONDS]        seconds per oha run (default 10; env BENCH_SECONDS)
#
# Other knobs (env): BENCH_RATES ("500 2000"), BENCH_CONNS (32), BENCH_MAX_CONNS (64),
# BENCH_SSE_MAX_CONNS (256), BENCH_WARMUP_SECONDS (1), BENCH_TTFB_REQUESTS (500),
# BENCH_MESSAGES_RATES (the last of BENCH_RATES; "" for maximum throughput only),
# BENCH_CHUNK_DELAY_MS (2), BENCH_DELAY_MS (0), BENCH_DIALECT_ROUNDS (3: interleaved rounds of the
# maximum-throughput rows of chat and each dialect), BENCH_SCALE_KEYS (100000; 0 skips the config-scale
# run), BENCH_NO_BUILD=1 (use the binaries already built), BENCH_OUT (bench/RESULTS.md),
# BENCH_KEEP=1 (keep the work dir), REDIS_URL (redis://127.0.0.1:6379), NGINX, CARGO_TARGET_DIR,
# BENCH_AB_DP=/path/to/another/llm-proxy-data-plane (A; the built one is B): after the dialect
# rounds, BENCH_AB_ROUNDS (3) rounds of the chat maximum-throughput rows, A then B back to back on
# the same control plane, mock and port (for the before/after of a hot-path change).
# BENCH_BODY_KIB ("16 128"; "" skips: the padded body sizes, max throughput only), BENCH_LOCAL_LIMITER
# (1; 0 skips the in-process limiter phase), BENCH_ALLOC_REQUESTS (2000; 0 skips the allocation count),
# BENCH_LATENCY_ROUNDS (3: rounds of direct, nginx and the data plane back to back at the top fixed
# rate, plus TTFB, and of nginx and the data plane at maximum throughput (both limiters), whose
# medians are held to the latency and CPU budgets; 0 skips them).
# Needs oha (cargo install oha --locked), nginx, taskset, python3, curl and a running Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${1:-${BENCH_SECONDS:-10}}
read -r -a rates <<<"${BENCH_RATES:-500 2000}"
read -r -a messages_rates <<<"${BENCH_MESSAGES_RATES-${rates[-1]}}"
conns=${BENCH_CONNS:-32}
max_conns=${BENCH_MAX_CONNS:-64}
sse_max_conns=${BENCH_SSE_MAX_CONNS:-256}
warmup_seconds=${BENCH_WARMUP_SECONDS:-1}
ttfb_requests=${BENCH_TTFB_REQUESTS:-500}
chunk_delay_ms=${BENCH_CHUNK_DELAY_MS:-2}
delay_ms=${BENCH_DELAY_MS:-0}
scale_keys=${BENCH_SCALE_KEYS:-100000}
dialect_rounds=${BENCH_DIALECT_ROUNDS:-3}
ab_dp=${BENCH_AB_DP:-}
ab_rounds=${BENCH_AB_ROUNDS:-3}
read -r -a body_kibs <<<"${BENCH_BODY_KIB-16 128}"
local_limiter=${BENCH_LOCAL_LIMITER:-1}
latency_rounds=${BENCH_LATENCY_ROUNDS:-3}
alloc_requests=${BENCH_ALLOC_REQUESTS:-2000}
out=${BENCH_OUT:-bench/RESULTS.md}
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
proxy_core=0
load_core=1

die() { echo "bench.sh: $*" >&2; exit 1; }
say() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }

# ---- tools ----
export PATH="$PATH:$HOME/.cargo/bin"
for tool in oha taskset python3 curl git; do
  command -v "$tool" >/dev/null || die "needs $tool on PATH (oha: cargo install oha --locked)"
done
nginx_bin=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
[[ -x $nginx_bin ]] || die "needs nginx (apt-get install nginx, or set NGINX=/path/to/nginx)"
[[ $(nproc) -ge 2 ]] || die "needs at least 2 cores (the proxy and the load generator are pinned apart)"
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || die "SECONDS must be a positive integer, not '$seconds'"
[[ $dialect_rounds =~ ^[0-9]+$ ]] || die "BENCH_DIALECT_ROUNDS must be a number, not '$dialect_rounds'"
[[ $ab_rounds =~ ^[0-9]+$ ]] || die "BENCH_AB_ROUNDS must be a number, not '$ab_rounds'"
[[ $latency_rounds =~ ^[0-9]+$ ]] || die "BENCH_LATENCY_ROUNDS must be a number, not '$latency_rounds'"
[[ $alloc_requests =~ ^[0-9]+$ ]] || die "BENCH_ALLOC_REQUESTS must be a number, not '$alloc_requests'"
for kib in "${body_kibs[@]}"; do
  [[ $kib =~ ^[0-9]+$ && $kib -gt 0 ]] || die "BENCH_BODY_KIB must list positive numbers, not '$kib'"
done
[[ -z $ab_dp || -x $ab_dp ]] || die "BENCH_AB_DP=$ab_dp is not an executable data plane binary"
python3 - "$redis_url" <<'PY' || die "Redis is not reachable at $redis_url (set REDIS_URL)"
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
try:
    s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=2)
    s.sendall(b"PING\r\n")
    reply = s.recv(64)
except OSError as e:
    sys.exit(f"bench.sh: {e}")
sys.exit(0 if reply.startswith((b"+PONG", b"-NOAUTH")) else 1)
PY

if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
  command -v cargo >/dev/null || die "needs cargo (or BENCH_NO_BUILD=1 with the binaries built)"
  say "building (release)"
  cargo build --release -q -p llm-proxy-control-plane -p llm-proxy-data-plane -p llmctl -p llm-proxy-mock-upstream --bins --examples
fi
bin=${CARGO_TARGET_DIR:-$root/target}/release
for b in llm-proxy-control-plane llm-proxy-data-plane llmctl llm-proxy-mock-upstream examples/ttfb \
  $( ((alloc_requests > 0)) && echo examples/allocs_per_request || true); do
  [[ -x $bin/$b ]] || die "missing $bin/$b (build it, or unset BENCH_NO_BUILD)"
done

# ---- processes ----
work=$(mktemp -d /tmp/llm-proxy-bench.XXXXXX)
mkdir -p "$work/runs"
pids=()
cleanup() {
  local rc=$?
  trap - EXIT
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ $rc -eq 0 && ${BENCH_KEEP:-0} != 1 ]]; then rm -rf "$work"; else echo "bench.sh: logs and raw results in $work" >&2; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
stop() { # pid: stop one process we started
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local keep=() p
  for p in "${pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  pids=("${keep[@]}")
}
alive() { kill -0 "$1" 2>/dev/null || die "$2 exited; see $work"; }

pick() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(pick); nginx_port=$(pick); cp_port=$(pick); cpm_port=$(pick); dp_port=$(pick); dpm_port=$(pick)

key=vk-bench-0123456789
body_json='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
body_sse='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"stream":true,"stream_options":{"include_usage":true}}'
# Anthropic Messages, as Claude Code sends it (small): x-api-key and anthropic-version headers.
messages_json='{"model":"claude-bench","max_tokens":256,"messages":[{"role":"user","content":"Say hello"}]}'
messages_sse='{"model":"claude-bench","max_tokens":256,"messages":[{"role":"user","content":"Say hello"}],"stream":true}'
# OpenAI Responses API, as Codex sends it (small): Bearer key.
responses_json='{"model":"gpt-4o-mini","input":"Say hello"}'
responses_sse='{"model":"gpt-4o-mini","input":"Say hello","stream":true}'

# The padded OpenAI chat bodies (BENCH_BODY_KIB): chat-MODE-Nk.json of exactly N KiB, the user
# message "Say hello xxx…"; used (through oha -D) while body_kib is set.
mkdir -p "$work/bodies"
python3 - "$work/bodies" "$body_json" "$body_sse" "${body_kibs[@]}" <<'PY'
import json, os, sys
out, small = sys.argv[1], {"json": sys.argv[2], "sse": sys.argv[3]}
for kib in sys.argv[4:]:
    for mode, text in small.items():
        body = json.loads(text)
        base = len(json.dumps(body, separators=(",", ":")))
        body["messages"][0]["content"] += " " + "x" * (int(kib) * 1024 - base - 1)
        data = json.dumps(body, separators=(",", ":"))
        assert len(data) == int(kib) * 1024, (kib, mode, len(data))
        with open(os.path.join(out, f"chat-{mode}-{kib}k.json"), "w") as f:
            f.write(data)
PY
body_kib=""

# api mode key: the request of one API (chat: OpenAI chat completions; messages: Anthropic
# Messages; responses: OpenAI Responses) in one mode (json, sse), in req_path, req_headers (curl/oha -H values), req_body and
# req_end (the text that ends its stream).
request_of() {
  if [[ $1 == messages ]]; then
    req_path=/v1/messages
    req_headers=("x-api-key: $3" "anthropic-version: 2023-06-01")
    [[ $2 == sse ]] && req_body=$messages_sse || req_body=$messages_json
    req_end="event: message_stop"
  elif [[ $1 == responses ]]; then
    req_path=/v1/responses
    req_headers=("authorization: Bearer $3")
    [[ $2 == sse ]] && req_body=$responses_sse || req_body=$responses_json
    req_end="event: response.completed"
  else
    req_path=/v1/chat/completions
    req_headers=("authorization: Bearer $3")
    [[ $2 == sse ]] && req_body=$body_sse || req_body=$body_json
    req_end="data: [DONE]"
  fi
  req_body_file=""
  if [[ $1 == chat && -n $body_kib ]]; then req_body_file=$work/bodies/chat-$2-${body_kib}k.json; fi
}
header_args() { # flag: req_headers as repeated flag value pairs, into hargs
  local h
  hargs=()
  for h in "${req_headers[@]}"; do hargs+=("$1" "$h"); done
}

wait_ok() { # name base-url [key [api]]: until a non-streamed request succeeds
  local i
  request_of "${4:-chat}" json "${3:-$key}"
  header_args -H
  for i in $(seq 150); do
    curl -sf -o /dev/null "${hargs[@]}" -H 'content-type: application/json' \
      -d "$req_body" "$2$req_path" && return
    sleep 0.1
  done
  die "$1 did not answer at $2$req_path; see $work"
}
wait_log() { # file message min_keys timeout_s: until a JSON log line with that message appears
  local deadline=$((SECONDS + $4))
  while ((SECONDS < deadline)); do
    python3 "$root/scripts/bench_report.py" log-line "$1" "$2" "$3" >/dev/null 2>&1 && return
    sleep 0.2
  done
  die "no '$2' log line with >= $3 keys in $1 after $4 s"
}
cpu_ticks() { # pids...: utime+stime summed (clock ticks; fields 14 and 15 of /proc/PID/stat)
  local total=0 p t
  for p in "$@"; do
    t=$(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')
    total=$((total + t))
  done
  echo "$total"
}
proc_counts() { # pids...: voluntary, nonvoluntary context switches (all threads) and syscr, syscw, summed
  local v=0 n=0 r=0 w=0 p a b c d
  for p in "$@"; do
    read -r a b < <(awk '$1 == "voluntary_ctxt_switches:" {v += $2} $1 == "nonvoluntary_ctxt_switches:" {n += $2}
      END {print v + 0, n + 0}' /proc/"$p"/task/*/status 2>/dev/null || true)
    read -r c d < <(awk '$1 == "syscr:" {r = $2} $1 == "syscw:" {w = $2} END {print r + 0, w + 0}' "/proc/$p/io" 2>/dev/null || true)
    v=$((v + ${a:-0})); n=$((n + ${b:-0})); r=$((r + ${c:-0})); w=$((w + ${d:-0}))
  done
  echo "$v $n $r $w"
}
status_kib() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; } # pid field

start_mock() {
  taskset -c "$load_core" "$bin/llm-proxy-mock-upstream" "127.0.0.1:$mock_port" --bench \
    --chunk-delay-ms "$chunk_delay_ms" --delay-ms "$delay_ms" 2>"$work/mock.log" &
  mock_pid=$!; pids+=("$mock_pid")
  wait_ok mock "http://127.0.0.1:$mock_port"
}

start_nginx() {
  local dir=$work/nginx keepalive=$((sse_max_conns > max_conns ? sse_max_conns : max_conns)) user="" buffer=16 kib
  for kib in "${body_kibs[@]}"; do ((kib + 1 > buffer)) && buffer=$((kib + 1)); done
  mkdir -p "$dir"
  [[ $(id -u) -eq 0 ]] && user="user root;"
  cat >"$dir/nginx.conf" <<EOF
$user
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/client_body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  # Request bodies in memory (nginx writes larger ones to a temporary file), up to the data
  # plane's own limit (32 MiB).
  client_body_buffer_size ${buffer}k;
  client_max_body_size 32m;
  upstream mock {
    server 127.0.0.1:$mock_port;
    keepalive $keepalive;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
  }
  server {
    listen 127.0.0.1:$nginx_port;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
  "$nginx_bin" -t -q -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" || die "nginx rejected $dir/nginx.conf"
  taskset -c "$proxy_core" "$nginx_bin" -e "$dir/error.log" -p "$dir" -c "$dir/nginx.conf" &
  nginx_pid=$!; pids+=("$nginx_pid")
  wait_ok nginx "http://127.0.0.1:$nginx_port"
  nginx_worker=$(pgrep -P "$nginx_pid" | head -n1)
  [[ -n $nginx_worker ]] || die "cannot find nginx's worker process"
}

start_cp() { # log file
  LLM_PROXY_LOG_FORMAT=json RUST_LOG=info "$bin/llm-proxy-control-plane" serve \
    --listen "127.0.0.1:$cp_port" --metrics-listen "127.0.0.1:$cpm_port" \
    --database-url "sqlite://$work/cp.db" --master-key-file "$work/master.key" 2>"$1" &
  cp_pid=$!; pids+=("$cp_pid")
  local i
  for i in $(seq 150); do
    curl -sf -o /dev/null "http://127.0.0.1:$cpm_port/readyz" && return
    alive "$cp_pid" "the control plane"
    sleep 0.1
  done
  die "the control plane did not become ready; see $1"
}
ctl() { "$bin/llmctl" --server "http://127.0.0.1:$cp_port" "$@" >/dev/null; }

start_dp() { # log file [binary [local]]: the data plane on the proxy core, Redis limiter (local: in-process), no per-request logs
  local limiter=(--redis-url "$redis_url")
  [[ ${3:-} == local ]] && limiter=()
  LLM_PROXY_DP_SHUTDOWN_GRACE_S=2 LLM_PROXY_LOG_FORMAT=json RUST_LOG=warn,llm_proxy_data_plane::sync=info taskset -c "$proxy_core" \
    "${2:-$bin/llm-proxy-data-plane}" --listen "127.0.0.1:$dp_port" --metrics-listen "127.0.0.1:$dpm_port" \
    --control-plane "http://127.0.0.1:$cp_port" "${limiter[@]}" 2>"$1" &
  dp_pid=$!; pids+=("$dp_pid")
}

# ---- one measurement ----
runs=$work/runs.tsv
: >"$runs"
oha_run() { # out base-url api conns rate|max mode key [seconds]
  request_of "$3" "$6" "$7"
  header_args -H
  local args=(--no-tui --output-format json -z "${8:-$seconds}s" -w -c "$4" -m POST
    "${hargs[@]}" -T application/json)
  if [[ -n $req_body_file ]]; then args+=(-D "$req_body_file"); else args+=(-d "$req_body"); fi
  [[ $5 == max* ]] || args+=(-q "${5%@*}") # max, or LOAD@N: round N of interleaved runs
  taskset -c "$load_core" oha "${args[@]}" "$2$req_path" >"$1" 2>"$1.err" || die "oha failed: $(cat "$1.err")"
  python3 "$root/scripts/bench_report.py" check "$1" || die "requests failed in $1 (see above)"
}
conns_for() { # api mode rate: enough connections to sustain the rate when answers take a while
  local ms=$((delay_ms + 1)) need gaps=3 # both streams come in 4 writes
  [[ $2 == sse ]] && ms=$((ms + gaps * (chunk_delay_ms + 1)))
  need=$(($3 * ms * 2 / 1000))
  echo $((need > conns ? need : conns))
}
# Redis's CPU is read too (not changed: it is the machine's server, unpinned) when it is local.
redis_pid=$(pgrep -x redis-server | head -n1 || true)
timed_run() { # target api mode load conns base-url key proxy-pids...: one oha run, with the proxy's CPU, peak RSS,
  # context switches and read/write syscalls
  local target=$1 api=$2 mode=$3 load=$4 c=$5 url=$6 k=$7 f t0 t1 c0=0 c1=0 r0=0 r1=0 hwm=0 ticks=- rticks=-
  local counts0=() counts1=() sys="-\t-\t-\t-"
  shift 7
  say "$target: $mode at $load req/s, $c connections, $seconds s"
  f=$work/runs/$target-$mode-$load.json
  if (($# > 0)); then read -r -a counts0 <<<"$(proc_counts "$@")"; c0=$(cpu_ticks "$@"); fi
  if [[ -n $redis_pid ]]; then r0=$(cpu_ticks "$redis_pid"); fi
  t0=$(date +%s.%N)
  oha_run "$f" "$url" "$api" "$c" "$load" "$mode" "$k"
  t1=$(date +%s.%N)
  if (($# > 0)); then
    c1=$(cpu_ticks "$@")
    read -r -a counts1 <<<"$(proc_counts "$@")"
    ticks=$((c1 - c0))
    sys="$((counts1[0] - counts0[0]))\t$((counts1[1] - counts0[1]))\t$((counts1[2] - counts0[2]))\t$((counts1[3] - counts0[3]))"
    hwm=$(status_kib "$1" VmHWM)
  fi
  if [[ -n $redis_pid ]]; then r1=$(cpu_ticks "$redis_pid"); rticks=$((r1 - r0)); fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%b\n' "$target" "$mode" "$load" "$c" "$f" "$ticks" \
    "$(python3 -c "print($t1 - $t0)")" "$hwm" "$rticks" "$sys" >>"$runs"
}
ttfb_run() { # out-base base-url api: sequential streams, time to first byte
  request_of "$3" sse "$key"
  header_args -H
  taskset -c "$load_core" "$bin/examples/ttfb" --addr "${2#http://}" --path "$req_path" \
    "${hargs[@]}" --body "$req_body" --end "$req_end" --requests "$ttfb_requests" --warmup 50 \
    >"$1.json" 2>"$1.err" || die "ttfb ($1): $(cat "$1.err")"
}
measure() { # target base-url api proxy-pids...: TTFB, then every load in both modes
  local target=$1 url=$2 api=$3 mode load c loads
  shift 3
  if [[ $api != chat ]]; then loads=("${messages_rates[@]}" max); else loads=("${rates[@]}" max); fi
  say "$target: warm-up, then time to first byte ($ttfb_requests sequential streams)"
  oha_run "$work/runs/$target-warmup.json" "$url" "$api" "$conns" 500 json "$key" "$warmup_seconds"
  ttfb_run "$work/ttfb-$target" "$url" "$api"
  for mode in json sse; do
    for load in "${loads[@]}"; do
      if [[ $load != max ]]; then
        c=$(conns_for "$api" "$mode" "$load")
      elif [[ $mode == sse ]]; then
        c=$sse_max_conns # streams last ~10 ms: it takes many to keep the proxy busy
      else
        c=$max_conns
      fi
      timed_run "$target" "$api" "$mode" "$load" "$c" "$url" "$key" "$@"
    done
  done
}
url_of() { echo "http://127.0.0.1:$1"; }

# ---- run ----
say "work dir $work; $seconds s per run; rates ${rates[*]} req/s and max; proxy on core $proxy_core, load on core $load_core"
start_mock
measure direct "$(url_of "$mock_port")" chat

start_nginx
measure nginx "$(url_of "$nginx_port")" chat "$nginx_worker"
nginx_hwm=$(status_kib "$nginx_worker" VmHWM)
body_runs() { # target base-url proxy-pid: maximum throughput, both modes, with each padded body
  for body_kib in "${body_kibs[@]}"; do
    for mode in json sse; do
      [[ $mode == sse ]] && c=$sse_max_conns || c=$max_conns
      timed_run "$1-${body_kib}k" chat "$mode" max "$c" "$2" "$key" "$3"
    done
  done
  body_kib=""
}
body_runs nginx "$(url_of "$nginx_port")" "$nginx_worker"
stop "$nginx_pid"

head -c 64 /dev/urandom | base64 -w0 >"$work/master.key"
start_cp "$work/cp.log"
ctl connection add --name Mock --provider openai --endpoint "http://127.0.0.1:$mock_port" --api-key sk-bench
# Priced as in production, so that every answer's cost is computed and counted.
ctl model add --conn-id Mock --name gpt-4o-mini --remote gpt-4o-mini --price-input 0.15 --price-output 0.60 --price-cache-read 0.075
ctl vkey add --name Bench --key "$key"
ctl assign --vkey-id Bench --model-id gpt-4o-mini --alias gpt-4o-mini --tps 1000000
ctl connection add --name MockAnthropic --provider anthropic --endpoint "http://127.0.0.1:$mock_port" --api-key sk-ant-bench
ctl model add --conn-id MockAnthropic --name claude-bench --remote claude-bench --price-input 3 --price-output 15
ctl assign --vkey-id Bench --model-id claude-bench --alias claude-bench --tps 1000000
start_dp "$work/dp.log"
wait_ok "the data plane" "$(url_of "$dp_port")"
wait_ok "the data plane (/v1/messages)" "$(url_of "$dp_port")" "$key" messages
wait_ok "the data plane (/v1/responses)" "$(url_of "$dp_port")" "$key" responses
measure llm-proxy "$(url_of "$dp_port")" chat "$dp_pid"
dp_hwm=$(status_kib "$dp_pid" VmHWM) # after the OpenAI chat runs, comparable with earlier results
measure llm-proxy-messages "$(url_of "$dp_port")" messages "$dp_pid"
measure llm-proxy-responses "$(url_of "$dp_port")" responses "$dp_pid"
# The dialect rows above ran minutes after the chat rows, and this VM's speed drifts by more than
# the 10% they are held to: run the maximum-throughput rows again back to back, chat then each
# dialect, round after round (A/B/C/A/B/C), and compare each round's runs with each other.
for ((round = 1; round <= dialect_rounds; round++)); do
  for mode in json sse; do
    [[ $mode == sse ]] && c=$sse_max_conns || c=$max_conns
    timed_run llm-proxy chat "$mode" "max@$round" "$c" "$(url_of "$dp_port")" "$key" "$dp_pid"
    timed_run llm-proxy-messages messages "$mode" "max@$round" "$c" "$(url_of "$dp_port")" "$key" "$dp_pid"
    timed_run llm-proxy-responses responses "$mode" "max@$round" "$c" "$(url_of "$dp_port")" "$key" "$dp_pid"
  done
done
# The padded bodies through the same data plane (Redis limiter), for the ratio to nginx's.
body_runs llm-proxy "$(url_of "$dp_port")" "$dp_pid"
# A/B: the chat maximum-throughput rows with another data plane binary (A) and this one (B), one
# after the other, round after round, each started afresh and warmed up on the same port.
if [[ -n $ab_dp ]]; then
  for ((round = 1; round <= ab_rounds; round++)); do
    for side in A B; do
      stop "$dp_pid"
      [[ $side == A ]] && dp_binary=$ab_dp || dp_binary=$bin/llm-proxy-data-plane
      start_dp "$work/dp-ab-$side-$round.log" "$dp_binary"
      wait_ok "the data plane ($side)" "$(url_of "$dp_port")"
      oha_run "$work/runs/ab-$side-$round-warmup.json" "$(url_of "$dp_port")" chat "$conns" 500 json "$key" "$warmup_seconds"
      for mode in json sse; do
        [[ $mode == sse ]] && c=$sse_max_conns || c=$max_conns
        timed_run "ab-$side" chat "$mode" "max@$round" "$c" "$(url_of "$dp_port")" "$key" "$dp_pid"
      done
    done
  done
fi
# Latency at the top fixed rate and streaming TTFB drift from minute to minute by more than the
# budgets they are held to (0.05 and 0.1 ms): run direct, nginx and the data plane again back to
# back, round after round; the report holds the medians of the rounds to the budgets.
if ((latency_rounds > 0)); then
  start_nginx
  top_rate=${rates[-1]}
  c=$(conns_for chat json "$top_rate")
  for ((round = 1; round <= latency_rounds; round++)); do
    timed_run direct chat json "$top_rate@$round" "$c" "$(url_of "$mock_port")" "$key"
    timed_run nginx chat json "$top_rate@$round" "$c" "$(url_of "$nginx_port")" "$key" "$nginx_worker"
    timed_run llm-proxy chat json "$top_rate@$round" "$c" "$(url_of "$dp_port")" "$key" "$dp_pid"
    # The CPU/req ratio to nginx at saturation, back to back (the Redis-limiter budget).
    timed_run nginx chat json "maxr@$round" "$max_conns" "$(url_of "$nginx_port")" "$key" "$nginx_worker"
    timed_run llm-proxy chat json "maxr@$round" "$max_conns" "$(url_of "$dp_port")" "$key" "$dp_pid"
    for target in nginx llm-proxy; do
      say "$target: time to first byte, round $round"
      [[ $target == nginx ]] && port=$nginx_port || port=$dp_port
      ttfb_run "$work/ttfb-$target@$round" "$(url_of "$port")" chat
    done
  done
  stop "$nginx_pid"
fi
# The in-process limiter: the same data plane binary without --redis-url, every body size.
if [[ $local_limiter == 1 ]]; then
  stop "$dp_pid"
  start_dp "$work/dp-local.log" "$bin/llm-proxy-data-plane" local
  wait_ok "the data plane (in-process limiter)" "$(url_of "$dp_port")"
  oha_run "$work/runs/local-warmup.json" "$(url_of "$dp_port")" chat "$conns" 500 json "$key" "$warmup_seconds"
  for mode in json sse; do
    [[ $mode == sse ]] && c=$sse_max_conns || c=$max_conns
    timed_run llm-proxy-local chat "$mode" max "$c" "$(url_of "$dp_port")" "$key" "$dp_pid"
  done
  body_runs llm-proxy-local "$(url_of "$dp_port")" "$dp_pid"
  # The in-process budget's ratio to nginx, back to back round after round.
  if ((latency_rounds > 0)); then
    start_nginx
    for ((round = 1; round <= latency_rounds; round++)); do
      timed_run nginx chat json "maxl@$round" "$max_conns" "$(url_of "$nginx_port")" "$key" "$nginx_worker"
      timed_run llm-proxy-local chat json "maxl@$round" "$max_conns" "$(url_of "$dp_port")" "$key" "$dp_pid"
    done
    stop "$nginx_pid"
  fi
fi
stop "$dp_pid" # SIGTERM: the data plane ships its last usage
# What the usage accounting stored for all of the above (DESIGN §18: rows per key × assignment ×
# hour, not per request).
python3 - "$work/cp.db" >"$work/usage.env" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows, requests, hours, pairs = db.execute(
    "SELECT COUNT(*), COALESCE(SUM(requests), 0), COUNT(DISTINCT hour), "
    "COUNT(DISTINCT vkey_id || ' ' || assignment_id) FROM usage_hourly").fetchone()
print(f"usage_rows={rows}\nusage_requests={requests}\nusage_hours={hours}\nusage_pairs={pairs}")
PY

scale=$work/scale.env
: >"$scale"
if ((scale_keys > 0)); then
  say "config scale: $scale_keys keys x 3 assignments"
  ctl model add --conn-id Mock --name scale-a --remote gpt-4o-mini
  ctl model add --conn-id Mock --name scale-b --remote gpt-4o-mini
  stop "$cp_pid"
  python3 scripts/bench_scale_fill.py "$work/cp.db" "$scale_keys" gpt-4o-mini scale-a scale-b
  start_cp "$work/cp-scale.log"
  wait_log "$work/cp-scale.log" "config snapshot built" "$scale_keys" 300
  start_dp "$work/dp-scale.log"
  wait_log "$work/dp-scale.log" "config snapshot applied" "$scale_keys" 300
  echo "applied_rss_kib=$(status_kib "$dp_pid" VmRSS)" >>"$scale"
  echo "applied_hwm_kib=$(status_kib "$dp_pid" VmHWM)" >>"$scale"
  scale_key=vk-scale-$(printf '%06d' $((scale_keys / 2)))
  wait_ok "the data plane (scale)" "$(url_of "$dp_port")" "$scale_key"
  timed_run scale chat json "${rates[-1]}" "$conns" "$(url_of "$dp_port")" "$scale_key" "$dp_pid"
  echo "loaded_rss_kib=$(status_kib "$dp_pid" VmRSS)" >>"$scale"
  echo "loaded_hwm_kib=$(status_kib "$dp_pid" VmHWM)" >>"$scale"
  # One admin write while both run: the control plane rebuilds, the data plane applies a second
  # 100k-key snapshot next to the first (peak memory of an update).
  ctl vkey add --name scale-extra --key vk-scale-extra-0123456789
  wait_log "$work/dp-scale.log" "config snapshot applied" "$((scale_keys + 2))" 300
  sleep 1 # the previous index is freed off the request path
  echo "update_rss_kib=$(status_kib "$dp_pid" VmRSS)" >>"$scale"
  echo "update_hwm_kib=$(status_kib "$dp_pid" VmHWM)" >>"$scale"
  stop "$dp_pid"
fi

if ((alloc_requests > 0)); then
  say "allocations per request ($alloc_requests sequential requests per mode, in one process)"
  "$bin/examples/allocs_per_request" --requests "$alloc_requests" >"$work/allocs.json" 2>"$work/allocs.err" ||
    die "allocs_per_request: $(tail -n 5 "$work/allocs.err")"
fi

mkdir -p "$(dirname "$out")"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $(git status --porcelain -- . ":!$out" 2>/dev/null) ]] || commit="$commit (with uncommitted changes)"
BENCH_SECONDS=$seconds BENCH_RATES="${rates[*]}" BENCH_MESSAGES_RATES="${messages_rates[*]}" BENCH_CONNS=$conns BENCH_MAX_CONNS=$max_conns BENCH_SSE_MAX_CONNS=$sse_max_conns \
  BENCH_TTFB_REQUESTS=$ttfb_requests BENCH_CHUNK_DELAY_MS=$chunk_delay_ms BENCH_DELAY_MS=$delay_ms \
  BENCH_SCALE_KEYS=$scale_keys BENCH_DIALECT_ROUNDS=$dialect_rounds BENCH_AB_ROUNDS=$([[ -n $ab_dp ]] && echo "$ab_rounds" || echo 0) BENCH_AB_DP=$ab_dp BENCH_COMMIT=$commit BENCH_NGINX_HWM_KIB=$nginx_hwm BENCH_DP_HWM_KIB=$dp_hwm \
  BENCH_NGINX_VERSION=$("$nginx_bin" -v 2>&1 | sed 's/^nginx version: //') BENCH_OHA_VERSION=$(oha --version) \
  BENCH_REDIS_URL=$redis_url BENCH_BODY_KIB="${body_kibs[*]}" BENCH_LOCAL_LIMITER=$local_limiter BENCH_ALLOC_REQUESTS=$alloc_requests BENCH_LATENCY_ROUNDS=$latency_rounds \
  python3 scripts/bench_report.py report "$work" >"$out"
cat "$out"
say "wrote $out"
