#!/usr/bin/env bash
# Gateway overhead benchmark (not a test): the same fixed request rate sent straight to a local mock
# upstream and through the data plane, reporting latency p50/p99 of both, the difference, the data
# plane's CPU time per request and its peak RSS. Needs `oha` (cargo install oha).
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

# One core for the data plane, as DESIGN §15 measures.
RUST_LOG=warn taskset -c 0 "$bin/llm-proxy-data-plane" --listen "127.0.0.1:$dp_port" --metrics-listen "127.0.0.1:$dpm_port" \
  --control-plane "http://127.0.0.1:$cp_port" 2>"$work/dp.log" & dp_pid=$!; pids+=($dp_pid)
body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
for _ in $(seq 100); do
  curl -sf -o /dev/null -H 'authorization: Bearer vk-bench-0123456789' -H 'content-type: application/json' \
    -d "$body" "http://127.0.0.1:$dp_port/v1/chat/completions" && break
  sleep 0.1
done

run() { # url -> "p50_ms p99_ms"
  oha --no-tui -z "${seconds}s" -q "$rate" -c 32 -m POST -H 'authorization: Bearer vk-bench-0123456789' \
    -T application/json -d "$body" --output-format json "$1" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); p=d["latencyPercentiles"]; s=d["summary"]; print("%.3f %.3f %.4f %.0f" % (p["p50"]*1000, p["p99"]*1000, s["successRate"], s["requestsPerSec"]))'
}
ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' "/proc/$dp_pid/stat"; }

read -r d50 d99 dok drps < <(run "http://127.0.0.1:$mock_port/v1/chat/completions")
c0=$(cpu)
read -r g50 g99 gok grps < <(run "http://127.0.0.1:$dp_port/v1/chat/completions")
c1=$(cpu)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$dp_pid/status")
python3 - "$d50" "$d99" "$g50" "$g99" "$dok" "$gok" "$grps" "$c0" "$c1" "$ticks" "$seconds" "$hwm" "$rate" <<'PY'
import sys
d50, d99, g50, g99, dok, gok, grps = map(float, sys.argv[1:8])
c0, c1, ticks, seconds, hwm, rate = map(float, sys.argv[8:14])
requests = grps * seconds
print(f"fixed rate {rate:.0f} req/s for {seconds:.0f} s, non-streamed chat completion")
print(f"direct to mock : p50 {d50:.3f} ms  p99 {d99:.3f} ms  (success {dok:.4f})")
print(f"through gateway: p50 {g50:.3f} ms  p99 {g99:.3f} ms  (success {gok:.4f})")
print(f"added latency  : p50 {g50 - d50:+.3f} ms  p99 {g99 - d99:+.3f} ms")
print(f"data plane CPU : {(c1 - c0) / ticks / requests * 1e6:.1f} us/request")
print(f"data plane peak RSS: {hwm / 1024:.1f} MiB")
PY
