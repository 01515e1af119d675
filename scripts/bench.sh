#!/usr/bin/env bash
# Gateway overhead benchmark (not a test): the same fixed request rate sent straight to a local mock
# upstream, through the data plane with in-process buckets, and through it with the Redis limiter
# (REDIS_URL, default redis://127.0.0.1:6379). Reports latency p50/p99 of each, the differences,
# the data plane's CPU time per request and its peak RSS. Needs `oha` (cargo install oha).
#
#   scripts/bench.sh [RATE=2000] [SECONDS=20]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-2000}
seconds=${2:-20}
command -v oha >/dev/null || { echo "bench.sh: needs oha (cargo install oha)" >&2; exit 1; }

cargo build --release -q -p llm-proxy-control-plane -p llm-proxy-data-plane -p llmctl --bins --example mock_upstream
bin=target/release
work=$(mktemp -d /tmp/llm-proxy-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

pick() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(pick); cp_port=$(pick); cpm_port=$(pick); dp_port=$(pick); dpm_port=$(pick)

taskset -c 1 "$bin/examples/mock_upstream" "127.0.0.1:$mock_port" & pids+=($!)
head -c 64 /dev/urandom | base64 -w0 > "$work/master.key"
"$bin/llm-proxy-control-plane" serve --listen "127.0.0.1:$cp_port" --metrics-listen "127.0.0.1:$cpm_port" \
  --database-url "sqlite://$work/cp.db" --master-key-file "$work/master.key" 2>"$work/cp.log" & pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$cpm_port/readyz" >/dev/null && break; sleep 0.1; done

ctl() { "$bin/llmctl" --endpoint "http://127.0.0.1:$cp_port" "$@" >/dev/null; }
ctl connection add --name Mock --provider openai --endpoint "http://127.0.0.1:$mock_port" --api-key sk-bench
ctl model add --conn-id Mock --name gpt-4o-mini --remote gpt-4o-mini
ctl vkey add --name Bench --key vk-bench-0123456789
ctl assign --vkey-id Bench --model-id gpt-4o-mini --alias gpt-4o-mini --tps 1000000

redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'

start_dp() { # extra data plane args...; sets dp_pid
  # One core for the data plane, as DESIGN §15 measures.
  RUST_LOG=warn taskset -c 0 "$bin/llm-proxy-data-plane" --listen "127.0.0.1:$dp_port" --metrics-listen "127.0.0.1:$dpm_port" \
    --control-plane "http://127.0.0.1:$cp_port" "$@" 2>>"$work/dp.log" & dp_pid=$!; pids+=($dp_pid)
  for _ in $(seq 100); do
    curl -sf -o /dev/null -H 'authorization: Bearer vk-bench-0123456789' -H 'content-type: application/json' \
      -d "$body" "http://127.0.0.1:$dp_port/v1/chat/completions" && return
    sleep 0.1
  done
  echo "bench.sh: the data plane did not come up" >&2; exit 1
}
stop_dp() { kill "$dp_pid"; wait "$dp_pid" 2>/dev/null || true; }

run() { # url -> "p50_ms p99_ms success rps"
  oha --no-tui -z "${seconds}s" -q "$rate" -c 32 -m POST -H 'authorization: Bearer vk-bench-0123456789' \
    -T application/json -d "$body" --output-format json "$1" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d["latencyPercentiles"]; s=d["summary"]; print("%.3f %.3f %.4f %.0f" % (p["p50"]*1000, p["p99"]*1000, s["successRate"], s["requestsPerSec"]))'
}
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$dp_pid/stat"; }

read -r d50 d99 dok drps < <(run "http://127.0.0.1:$mock_port/v1/chat/completions")

start_dp
c0=$(cpu)
read -r g50 g99 gok grps < <(run "http://127.0.0.1:$dp_port/v1/chat/completions")
c1=$(cpu)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$dp_pid/status")
stop_dp

start_dp --redis-url "$redis_url"
r0=$(cpu)
read -r r50 r99 rok rrps < <(run "http://127.0.0.1:$dp_port/v1/chat/completions")
r1=$(cpu)
stop_dp

python3 - "$d50" "$d99" "$g50" "$g99" "$dok" "$gok" "$grps" "$c0" "$c1" "$ticks" "$seconds" "$hwm" "$rate" "$r50" "$r99" "$rok" "$rrps" "$r0" "$r1" <<'PY'
import sys
d50, d99, g50, g99, dok, gok, grps = map(float, sys.argv[1:8])
c0, c1, ticks, seconds, hwm, rate = map(float, sys.argv[8:14])
r50, r99, rok, rrps, r0, r1 = map(float, sys.argv[14:20])
print(f"fixed rate {rate:.0f} req/s for {seconds:.0f} s, non-streamed chat completion, limit on every request")
print(f"direct to mock             : p50 {d50:.3f} ms  p99 {d99:.3f} ms  (success {dok:.4f})")
print(f"gateway, in-process limiter: p50 {g50:.3f} ms  p99 {g99:.3f} ms  (success {gok:.4f})")
print(f"gateway, Redis limiter     : p50 {r50:.3f} ms  p99 {r99:.3f} ms  (success {rok:.4f})")
print(f"added by the gateway       : p50 {g50 - d50:+.3f} ms  p99 {g99 - d99:+.3f} ms")
print(f"added by Redis vs in-process: p50 {r50 - g50:+.3f} ms  p99 {r99 - g99:+.3f} ms")
print(f"data plane CPU             : {(c1 - c0) / ticks / (grps * seconds) * 1e6:.1f} us/request in-process, {(r1 - r0) / ticks / (rrps * seconds) * 1e6:.1f} us/request with Redis")
print(f"data plane peak RSS (in-process run): {hwm / 1024:.1f} MiB")
PY
