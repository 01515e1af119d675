#!/usr/bin/env bash
# The project's one test command (README, .ci/run). Uses the Postgres and Redis on their standard
# local ports when they answer; otherwise starts throwaway instances from the local binaries and
# stops them on exit. Then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

scratch=$(mktemp -d /tmp/llm-proxy-test.XXXXXX)
cleanup() {
  if [[ -n "${started_pg:-}" ]]; then
    as_postgres "$pg_bin/pg_ctl" -D "$scratch/pg" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [[ -n "${started_redis:-}" ]]; then
    redis-cli -p 56379 shutdown nosave >/dev/null 2>&1 || true
  fi
  rm -rf "$scratch"
}
trap cleanup EXIT

# Postgres refuses to run as root: run its tools as the postgres user when we are root.
as_postgres() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_answers() { psql "$1" -Atqc 'select 1' >/dev/null 2>&1; }

export TEST_DATABASE_URL=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
if ! pg_answers "$TEST_DATABASE_URL"; then
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [[ -z "$pg_bin" || ! -x "$pg_bin/initdb" ]]; then
    echo "test.sh: no Postgres answers at $TEST_DATABASE_URL and no initdb was found to start one" >&2
    echo "test.sh: install PostgreSQL (apt-get install postgresql) or set TEST_DATABASE_URL" >&2
    exit 1
  fi
  echo "test.sh: starting a throwaway Postgres on 127.0.0.1:55432" >&2
  mkdir -p "$scratch/pg"
  [[ $(id -u) -eq 0 ]] && chown postgres "$scratch" "$scratch/pg"
  as_postgres "$pg_bin/initdb" -D "$scratch/pg" -U postgres --auth=trust >/dev/null
  as_postgres "$pg_bin/pg_ctl" -D "$scratch/pg" -l "$scratch/pg/log" -w \
    -o "-p 55432 -k $scratch -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
  started_pg=1
  psql "postgres://postgres@127.0.0.1:55432/postgres" -qc 'CREATE DATABASE test'
  export TEST_DATABASE_URL=postgres://postgres@127.0.0.1:55432/test
fi
# Each test works in its own schema t_...; drop those left by earlier runs.
psql "$TEST_DATABASE_URL" -Atqc "select format('DROP SCHEMA %I CASCADE;', nspname) from pg_namespace where nspname like 't\_%'" \
  | psql "$TEST_DATABASE_URL" -q >/dev/null 2>&1 || true

export TEST_REDIS_URL=${TEST_REDIS_URL:-redis://127.0.0.1:6379}
if ! redis-cli -u "$TEST_REDIS_URL" ping >/dev/null 2>&1; then
  if ! command -v redis-server >/dev/null; then
    echo "test.sh: no Redis answers at $TEST_REDIS_URL and redis-server is not installed" >&2
    exit 1
  fi
  echo "test.sh: starting a throwaway Redis on 127.0.0.1:56379" >&2
  redis-server --port 56379 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$scratch" --logfile "$scratch/redis.log"
  started_redis=1
  for _ in $(seq 50); do redis-cli -p 56379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  export TEST_REDIS_URL=redis://127.0.0.1:56379
fi

status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi

# End to end: the real binaries (and the mock upstream, llm-proxy-mock-upstream) driven by the
# official OpenAI and Anthropic Python SDKs, the Claude Code CLI and the Codex CLI. The workspace
# test build above built most of them already.
if [[ $# -eq 0 ]]; then
  cargo build -q --workspace --bins
  # Installs or upgrades only what does not satisfy e2e/requirements.txt (the Responses API tests
  # need a recent openai SDK, so an older one already installed is upgraded).
  python3 -m pip install -q -r e2e/requirements.txt
  # Claude Code (e2e/test_claude_code.py) and Codex (e2e/test_codex.py) from the npm registry, into
  # e2e/.node (gitignored), once. One install for both: a later `npm install --no-save` into the
  # same prefix would remove the other. Without npm their tests skip and say why; a failed install
  # fails them.
  claude_code_version=2.1.197
  codex_version=0.171.0
  if command -v npm >/dev/null && [[ ! -x e2e/.node/node_modules/.bin/claude || ! -x e2e/.node/node_modules/.bin/codex ]]; then
    npm install --prefix e2e/.node --no-save --no-audit --no-fund --loglevel=error \
      "@anthropic-ai/claude-code@$claude_code_version" "@openai/codex@$codex_version" \
      || echo "test.sh: installing Claude Code and Codex failed" >&2
  fi
  # The local-cluster test (scripts/local-cluster.sh) uses the same Postgres server and Redis.
  export CLUSTER_PG_ADMIN_URL=${CLUSTER_PG_ADMIN_URL:-${TEST_DATABASE_URL%/*}/postgres}
  if [[ $TEST_REDIS_URL != redis://127.0.0.1:6379 ]]; then
    export CLUSTER_REDIS_URL=${CLUSTER_REDIS_URL:-$TEST_REDIS_URL/5}
  fi
  LLMCTL_BIN="$PWD/target/debug/llmctl" python3 -m pytest -q e2e || status=$?
fi
exit "$status"
