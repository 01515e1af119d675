#!/usr/bin/env bash
# Instructions per request of data plane binaries, counted by valgrind's callgrind (not a test).
# Wall-clock CPU on these VMs drifts by ±15% within the hour; instruction counts are stable to
# well under 1%, so hot-path steps of 1–5% are compared here, and against nginx by bench.sh.
#
#   scripts/ir-per-request.sh DP_BINARY [DP_BINARY...]
#
# Each binary serves the same set-up in turn (OpenAI chat to the bench mock, in-process
# limiter, priced model, one key), rounds A/B/A/B: 200 warm-up requests, then counters zeroed,
# IR_REQUESTS (default 1000) sequential keep-alive requests, non-streamed then streamed.
# Knobs: IR_API (chat, or responses: OpenAI's Responses API passed through), IR_ROUNDS
# (default 2), IR_REQUESTS, IR_KEEP=DIR (keep each profile, for
# callgrind_annotate), IR_CPU=N (run the data plane on CPU N only, as bench.sh does: with one
# CPU it picks its single-threaded runtime). The data plane logs at RUST_LOG, `warn` when unset
# (as bench.sh runs it; the product's default, `info`, adds the request span's formatting). A DP_BINARY may be a script that execs the data
# plane (e.g. to set its environment). Needs valgrind and curl; release binaries of the
# control plane, llmctl and the mock in CARGO_TARGET_DIR (or target/)/release.
set -euo pipefail

die() { echo "ir-per-request: $*" >&2; exit 1; }
(($# >= 1)) || die "usage: $0 DP_BINARY [DP_BINARY...]"
command -v valgrind >/dev/null || die "valgrind is not installed (apt-get install valgrind)"
command -v callgrind_control >/dev/null || die "callgrind_control is missing (part of valgrind)"
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
for b in llm-proxy-control-plane llmctl llm-proxy-mock-upstream; do
  [[ -x $bin/$b ]] || die "$bin/$b is missing: cargo build --release --bins"
done
for dp in "$@"; do [[ -x $dp ]] || die "$dp is not an executable"; done
rounds=${IR_ROUNDS:-2}
export RUST_LOG=${RUST_LOG:-warn}
requests=${IR_REQUESTS:-1000}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
pick() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock_port=$(pick); cp_port=$(pick); cpm_port=$(pick); dp_port=$(pick); dpm_port=$(pick)
key=vk-bench-0123456789

"$bin/llm-proxy-mock-upstream" "127.0.0.1:$mock_port" --bench --chunk-delay-ms 0 >"$work/mock.log" 2>&1 &
pids+=($!)
head -c 64 /dev/urandom | base64 -w0 >"$work/master.key"
"$bin/llm-proxy-control-plane" serve --listen "127.0.0.1:$cp_port" --metrics-listen "127.0.0.1:$cpm_port" \
  --database-url "sqlite://$work/cp.db" --master-key-file "$work/master.key" 2>"$work/cp.log" &
pids+=($!)
for _ in $(seq 150); do
  curl -sf -o /dev/null "http://127.0.0.1:$cpm_port/readyz" && break
  sleep 0.1
done
curl -sf -o /dev/null "http://127.0.0.1:$cpm_port/readyz" || die "the control plane did not start; $(tail -3 "$work/cp.log")"
ctl() { "$bin/llmctl" --server "http://127.0.0.1:$cp_port" "$@" >/dev/null; }
ctl connection add --name Mock --provider openai --endpoint "http://127.0.0.1:$mock_port" --api-key sk-bench
ctl model add --conn-id Mock --name gpt-4o-mini --remote gpt-4o-mini --price-input 0.15 --price-output 0.60
ctl vkey add --name Bench --key "$key"
ctl assign --vkey-id Bench --model-id gpt-4o-mini --alias gpt-4o-mini --tps 1000000

if [[ ${IR_API:-chat} == responses ]]; then
  url=http://127.0.0.1:$dp_port/v1/responses
  body_json='{"model":"gpt-4o-mini","input":"hi"}'
  body_sse='{"model":"gpt-4o-mini","stream":true,"input":"hi"}'
else
  url=http://127.0.0.1:$dp_port/v1/chat/completions
  body_json='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
  body_sse='{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
fi
requests_of() { # count mode: a curl config of `count` requests on one keep-alive connection
  local body=$body_json
  [[ $2 == sse ]] && body=$body_sse
  {
    printf 'silent\nwrite-out = "\\n@@%%{http_code}\\n"\nheader = "authorization: Bearer %s"\nheader = "content-type: application/json"\n' "$key"
    printf 'data = %s\n' "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$body")"
    for ((i = 0; i < $1; i++)); do printf 'url = "%s"\n' "$url"; done
  } >"$work/req-$2-$1.cfg"
}
for mode in json sse; do requests_of 200 "$mode"; requests_of "$requests" "$mode"; done

ir_of() { # callgrind output file: total instructions (the `summary:` line)
  awk '/^summary:/ {print $2}' "$1"
}
measure() { # label binary
  local out=$work/cg.out
  local pin=()
  [[ -n ${IR_CPU:-} ]] && pin=(taskset -c "$IR_CPU")
  "${pin[@]}" valgrind --tool=callgrind --trace-children=yes --callgrind-out-file="$out" "$2" --listen "127.0.0.1:$dp_port" \
    --metrics-listen "127.0.0.1:$dpm_port" --control-plane "http://127.0.0.1:$cp_port" \
    2>"$work/dp.log" &
  local vg=$!
  pids+=("$vg")
  for _ in $(seq 600); do
    [[ $(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $key" \
      -H 'content-type: application/json' -d "$body_json" "$url") == 200 ]] && break
    kill -0 "$vg" 2>/dev/null || die "the data plane exited; $(tail -3 "$work/dp.log")"
    sleep 0.2
  done
  local mode line=("$1")
  for mode in json sse; do
    curl -K "$work/req-$mode-200.cfg" >/dev/null
    callgrind_control -z "$vg" >/dev/null 2>&1
    curl -K "$work/req-$mode-$requests.cfg" >"$work/answers"
    rm -f "$out".*
    callgrind_control -d "$vg" >/dev/null 2>&1
    local ok
    ok=$(grep -c '^@@200$' "$work/answers" || true)
    ((ok == requests)) || die "$2: $ok of $requests $mode requests answered 200 ($(grep -m1 -v '^@@' "$work/answers" | head -c 300))"
    local dump
    dump=$(ls "$out".* | tail -n1)
    line+=("$(($(ir_of "$dump") / requests))")
    if [[ -n ${IR_KEEP:-} ]]; then mkdir -p "$IR_KEEP"; cp "$dump" "$IR_KEEP/$(basename "$2").$mode.$round.callgrind"; fi
  done
  kill "$vg"; wait "$vg" 2>/dev/null || true
  rm -f "$out" "$out".*
  printf '%s\t%s\t%s\n' "${line[@]}"
}

printf 'binary\tjson Ir/req\tsse Ir/req\n'
for ((round = 1; round <= rounds; round++)); do
  n=0
  for dp in "$@"; do
    n=$((n + 1))
    measure "$n:$(basename "$(dirname "$dp")")/$(basename "$dp")" "$dp"
  done
done
