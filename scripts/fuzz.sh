#!/usr/bin/env bash
# Runs the cargo-fuzz targets under fuzz/ for a bounded time each (run by .ci/run): the body
# parser and request translators (request), the SSE splitter and SSE stream translators (sse), the
# event-stream decoder and Bedrock stream translator (event_stream), the non-streamed answer and
# error mappings (answer), the Responses stream writer on arbitrary model events
# (responses_events). Each target runs on its corpus, fuzz/corpus/<target>/ (kept in the
# repository: the golden fixtures' seeds from fuzz/seeds.py plus what earlier runs found, minimised
# with `cargo +nightly fuzz cmin`), and on the kept findings under fuzz/regressions/<target>/,
# which the stable test suite also replays (data-plane/tests/fuzz_regressions.rs). New corpus
# entries a run finds land in fuzz/corpus/<target>/: commit them (after cmin) to keep them.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   seconds per target (default 20; env FUZZ_SECONDS)
#
# Needs the nightly toolchain (cargo +nightly) and cargo-fuzz (installed when missing). A finding
# fails the run: libFuzzer prints the input's path under fuzz/artifacts/<target>/; fix the bug,
# then copy the input to fuzz/regressions/<target>/. Memory past 2 GiB or one input running 10 s
# counts as a finding.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:$HOME/.cargo/bin"

seconds=${1:-${FUZZ_SECONDS:-20}}
[[ $# -gt 0 ]] && shift
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(request sse event_stream answer responses_events)
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || {
  echo "fuzz.sh: SECONDS must be a positive integer, not '$seconds'" >&2
  exit 1
}
cargo +nightly --version >/dev/null 2>&1 || {
  echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked -q
fi

scratch=$(mktemp -d /tmp/llm-proxy-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
python3 fuzz/seeds.py

# cargo-fuzz's default build: optimised, with debug assertions and overflow checks (an overflow
# on an upstream's number is a finding). No sanitizer: the gateway's crates forbid unsafe code, and
# without ASan the build is faster and each target runs about twice as many inputs.
fuzz=(--sanitizer none)
cd fuzz
cargo +nightly fuzz build "${fuzz[@]}"
for target in "${targets[@]}"; do
  mkdir -p "regressions/$target" "corpus/$target"
  echo "fuzz.sh: $target for ${seconds}s" >&2
  cargo +nightly fuzz run "${fuzz[@]}" "$target" "corpus/$target" "regressions/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=65536 \
    -print_final_stats=1 2>"$scratch/$target.log" || {
      tail -n 40 "$scratch/$target.log" >&2
      echo "fuzz.sh: $target found a failing input (see above and fuzz/artifacts/$target/)" >&2
      exit 1
    }
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE' "$scratch/$target.log" >&2 || true
done
