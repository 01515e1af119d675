#!/usr/bin/env python3
"""Helpers of scripts/bench.sh.

    bench_report.py check OHA_JSON                  exit 1 unless every request succeeded (200)
    bench_report.py log-line LOG MESSAGE MIN_KEYS   print the fields of the last JSON log line with
                                                    that message and virtual_keys >= MIN_KEYS
    bench_report.py report WORK_DIR                 the Markdown of bench/RESULTS.md, from the raw
                                                    results bench.sh left in WORK_DIR (settings in
                                                    BENCH_* environment variables)
"""
import datetime
import json
import os
import platform
import statistics
import sys

TARGETS = ("direct", "nginx", "llm-proxy")
# The same data plane serving the other inbound dialects, passed through to the mock: target,
# route, and what the mock's stream of that dialect is.
DIALECTS = (
    ("llm-proxy-messages", "/v1/messages", "7 Anthropic events"),
    ("llm-proxy-responses", "/v1/responses", "9 Responses API events"),
)
DIALECT_TARGETS = tuple(target for target, _, _ in DIALECTS)
MODES = {"json": "non-streamed", "sse": "streamed"}
MIB = 1024.0

# The budgets of DESIGN §15, every one a ratio to (or a difference from) nginx in the same run.
CPU_LOCAL_MAX_RATIO = 1.5  # non-streamed, ~100 B, saturated core, in-process buckets
CPU_REDIS_MAX_RATIO = 1.8  # the same with the Redis limiter
CPU_BODY_MAX_RATIO = 2.0  # 16 KiB and 128 KiB request bodies
ADDED_P50_MAX_DIFF_MS = 0.05  # at the top fixed rate
TTFB_MAX_DIFF_MS = 0.1
DIALECT_CPU_MAX_RATIO = 1.10
LOAD_RSS_MAX_MIB = 32.0
SCALE_RSS_MAX_MIB = 64.0
MIN_ADDED_MS = 0.01
UNDER_RATE = 0.95

def load_oha(path):
    with open(path) as f:
        return json.load(f)


def check(path):
    d = load_oha(path)
    s = d["summary"]
    codes = d.get("statusCodeDistribution") or {}
    # Requests cut off at the end of the run are not failures (oha leaves them out of successRate).
    errors = {k: v for k, v in (d.get("errorDistribution") or {}).items() if k != "aborted due to deadline"}
    ok = s.get("successRate") == 1.0 and set(codes) == {"200"} and not errors
    if not ok:
        print(
            f"{path}: success rate {s.get('successRate')}, status codes {codes}, errors {errors}",
            file=sys.stderr,
        )
        sys.exit(1)


def log_fields(line):
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict):
        return None
    fields = dict(event.get("fields") or {})
    for k, v in event.items():
        if k not in ("fields", "span", "spans"):
            fields.setdefault(k, v)
    return fields


def log_lines(path, message, min_keys=0):
    """Fields of every JSON log line with that message and at least min_keys virtual keys."""
    found = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                fields = log_fields(line)
                if fields and fields.get("message") == message and int(fields.get("virtual_keys", 0)) >= min_keys:
                    found.append(fields)
    except FileNotFoundError:
        pass
    return found


def log_line(path, message, min_keys):
    found = log_lines(path, message, int(min_keys))
    if not found:
        sys.exit(1)
    print(json.dumps(found[-1]))


# ---------------------------------------------------------------- report


def fmt(value, digits=3, signed=False):
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def ratio(a, b, digits=2):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.{digits}f}×"


def added_ratio(a, b):
    """Ratio of two added latencies; n/a when the denominator is too small to divide by."""
    return ratio(a, b) if b is not None and b >= MIN_ADDED_MS else "n/a"


def verdict(ok):
    return "**PASS**" if ok else "**MISS**"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def read_runs(work):
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    runs = {}
    with open(os.path.join(work, "runs.tsv")) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            target, mode, load, conns, path, ticks, wall, hwm, redis_ticks = fields[:9]
            # Context switches (voluntary, nonvoluntary) and read/write syscalls of the proxy
            # during the run; absent in older files, "-" without a proxy process.
            counts = fields[9:13] if len(fields) >= 13 else ["-"] * 4
            d = load_oha(path)
            count = sum((d.get("statusCodeDistribution") or {}).values())
            p = d["latencyPercentiles"]
            run = {
                "conns": int(conns),
                "rps": d["summary"]["requestsPerSec"],
                "count": count,
                "p50": p["p50"] * 1000,
                "p90": p["p90"] * 1000,
                "p99": p["p99"] * 1000,
                "load": load,
                "cpu_us": None,
                "busy": None,
                "redis_us": None,
                "hwm_mib": int(hwm) / MIB if hwm not in ("", "0") else None,
            }
            for name, value in zip(("csw_v", "csw_n", "syscr", "syscw"), counts):
                run[name] = int(value) / count if value not in ("-", "") and count else None
            if ticks != "-" and count:
                cpu_s = int(ticks) / ticks_per_s
                run["cpu_us"] = cpu_s / count * 1e6
                run["busy"] = cpu_s / float(wall)
            if target in ("llm-proxy", *DIALECT_TARGETS, "scale") and redis_ticks != "-" and count:
                run["redis_us"] = int(redis_ticks) / ticks_per_s / count * 1e6
            runs[(target, mode, load)] = run
    return runs


def read_env_file(path):
    values = {}
    try:
        with open(path) as f:
            for line in f:
                if "=" in line:
                    k, v = line.strip().split("=", 1)
                    values[k] = v
    except FileNotFoundError:
        pass
    return values


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc), {model}, Linux {platform.release()}"


def load_name(l):
    return "max" if l == "max" else f"{l}/s"


def body_label(kib):
    return "~100 B" if kib is None else f"{kib} KiB"


def sized(target, kib):
    """The target of a padded-body run (bench.sh's body_runs): nginx-16k, llm-proxy-local-128k, …"""
    return target if kib is None else f"{target}-{kib}k"


def cpu_vs_nginx(w, run, body_kibs, local):
    """Data plane CPU/req against nginx's, same body size and mode, maximum throughput."""
    w("## CPU/req vs nginx (OpenAI chat, maximum throughput, same run)")
    w("")
    rows = []
    limiters = [("Redis", "llm-proxy")] + ([("in-process", "llm-proxy-local")] if local else [])
    for limiter, target in limiters:
        for kib in [None, *body_kibs]:
            for m in MODES:
                g, n = run(sized(target, kib), m, "max"), run(sized("nginx", kib), m, "max")
                if not g:
                    continue
                gc, nc = g["cpu_us"], n and n["cpu_us"]
                rows.append(
                    [
                        limiter,
                        body_label(kib),
                        MODES[m],
                        f"{n['rps']:.0f}" if n else "n/a",
                        f"{g['rps']:.0f}",
                        fmt(nc, 1),
                        fmt(gc, 1),
                        ratio(gc, nc),
                        fmt(gc - nc, 1, signed=True) if gc is not None and nc is not None else "n/a",
                        fmt(n and n["busy"], 2),
                        fmt(g["busy"], 2),
                    ]
                )
    if not rows:
        w("Not measured.")
        w("")
        return
    w(
        table(
            [
                "limiter",
                "body",
                "mode",
                "nginx req/s",
                "llm-proxy req/s",
                "nginx CPU/req µs",
                "llm-proxy CPU/req µs",
                "÷ nginx",
                "− nginx µs",
                "nginx core busy",
                "llm-proxy core busy",
            ],
            rows,
        )
    )
    w("")
    w(
        "The data plane's CPU/req ÷ (and −) nginx's worker's at the same body size and mode. The ~100 B "
        "rows are the max-throughput rows of the Runs table; the padded bodies (the user message of the "
        "same request padded to the size) are runs of their own, nginx right after its other runs, the "
        "Redis-limiter data plane after the dialect rounds; the in-process limiter rows come from the same "
        "data plane binary restarted without `--redis-url` at the end."
    )
    w("")


def syscalls_table(w, runs):
    """Context switches and read/write syscalls per request of every run with a proxy process."""
    w("## Context switches and syscalls per request")
    w("")
    rows = []
    for (t, m, l), r in runs.items():  # in the order they ran
        if "@" in l or r.get("csw_v") is None:
            continue
        rows.append(
            [
                t,
                MODES.get(m, m),
                load_name(l),
                f"{r['rps']:.0f}",
                fmt(r["csw_v"], 2),
                fmt(r["csw_n"], 2),
                fmt(r["csw_v"] + r["csw_n"], 2),
                fmt(r["syscr"], 2),
                fmt(r["syscw"], 2),
            ]
        )
    if not rows:
        w("Not measured.")
        w("")
        return
    w(
        table(
            ["target", "mode", "load", "req/s", "voluntary cs/req", "nonvoluntary cs/req", "cs/req", "read syscalls/req", "write syscalls/req"],
            rows,
        )
    )
    w("")
    w(
        "Per request answered, during the run: context switches of the proxy process (`voluntary_ctxt_switches` + "
        "`nonvoluntary_ctxt_switches` of /proc/PID/task/*/status, every live thread; nginx: its worker) and "
        "`syscr`, `syscw` of /proc/PID/io. Those count the read(2)/readv/pread and write(2)/writev/pwrite/"
        "sendfile families only, not recv*/send* nor epoll: both proxies read sockets with recv(2) (and the "
        "data plane's single-buffer socket writes are send(2)), so syscr stays near 0 and syscw counts "
        "mostly writev calls; compare the two proxies with that in mind. Interleaved and A/B rounds are left out."
    )
    w("")


def allocs_section(w, work, env):
    path = os.path.join(work, "allocs.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        a = json.load(f)
    w("## Heap allocations per request (data plane)")
    w("")
    rows = []
    for m in MODES:
        x = a.get(m)
        if not x:
            continue
        rows.append(
            [
                MODES[m],
                x.get("body_bytes", "?"),
                fmt(x["allocs_per_request"], 1),
                fmt(x["reallocs_per_request"], 1),
                f"{x['bytes_per_request']:.0f}",
                fmt(x["through"]["allocs_per_request"], 1),
                fmt(x["direct"]["allocs_per_request"], 1),
                f"{x['through']['bytes_per_request']:.0f}",
                f"{x['direct']['bytes_per_request']:.0f}",
            ]
        )
    w(
        table(
            [
                "mode",
                "body bytes",
                "data plane allocs/req",
                "reallocs/req",
                "bytes/req",
                "through: allocs/req",
                "direct: allocs/req",
                "through: bytes/req",
                "direct: bytes/req",
            ],
            rows,
        )
    )
    w("")
    w(
        f"`data-plane/examples/allocs_per_request` ({a.get('requests')} sequential requests per mode on "
        "one keep-alive connection, the benchmark's small bodies, lowest of 3 rounds): mock upstream, control plane, data plane "
        "(in-process limiter) and the reqwest client in one process under a counting global allocator "
        "(`stats_alloc`). **through** = client + data plane + mock, **direct** = the same requests from the "
        "same client straight to the mock (client + mock); the data plane's figures are through − direct. "
        "allocs = alloc and alloc_zeroed calls; reallocs are counted apart; bytes = bytes requested by both "
        "(growth only, for reallocs). Counted only while the requests run, background tasks included."
    )
    w("")


def dialect_table(w, route, stream_events, measured, interleaved):
    """The table of one dialect's passthrough rows against the OpenAI chat rows."""
    name = route.rsplit("/", 1)[-1]
    w(f"## {route} passthrough ÷ OpenAI chat (same data plane, same run)")
    w("")
    if measured:
        rows = []
        for m, l, c, a in measured:
            rows.append(
                [
                    MODES[m],
                    load_name(l),
                    f"{c['rps']:.0f}",
                    f"{a['rps']:.0f}",
                    ratio(a["rps"], c["rps"]),
                    fmt(c["cpu_us"], 1),
                    fmt(a["cpu_us"], 1),
                    ratio(a["cpu_us"], c["cpu_us"]),
                    ratio(a["p50"], c["p50"]),
                    ratio(a["p99"], c["p99"]),
                ]
            )
        w(
            table(
                [
                    "mode",
                    "load",
                    "chat req/s",
                    f"{name} req/s",
                    "req/s ratio",
                    "chat CPU/req µs",
                    f"{name} CPU/req µs",
                    "CPU/req ratio",
                    "p50 ratio",
                    "p99 ratio",
                ],
                rows,
            )
        )
        w("")
        w(
            f"Ratios are {route} ÷ /v1/chat/completions; the target is CPU/req ≤ {DIALECT_CPU_MAX_RATIO:.2f}× "
            f"at maximum throughput (the saturated cost). A stream is {stream_events} against chat's 4, sent in "
            "the same 4 writes."
        )
    else:
        w("Not measured.")
    w("")
    if interleaved:
        w(
            "Maximum throughput again, back to back (chat, then each dialect, round after round), so that "
            "the ratio does not take in the machine's drift between runs minutes apart; the target holds "
            "the median round:"
        )
        w("")
        rows = [
            [
                MODES[m],
                str(i),
                f"{c['rps']:.0f}",
                f"{a['rps']:.0f}",
                fmt(c["cpu_us"], 1),
                fmt(a["cpu_us"], 1),
                ratio(a["cpu_us"], c["cpu_us"]),
            ]
            for m, i, c, a in interleaved
        ]
        w(
            table(
                ["mode", "round", "chat req/s", f"{name} req/s", "chat CPU/req µs", f"{name} CPU/req µs", "CPU/req ratio"],
                rows,
            )
        )
        w("")


def load_ttfb(work, name):
    """A TTFB run's JSON (data-plane/examples/ttfb.rs), or None when that run was not made."""
    path = os.path.join(work, f"ttfb-{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def report(work):
    env = os.environ
    seconds = env.get("BENCH_SECONDS", "?")
    rates = env.get("BENCH_RATES", "500 2000").split()
    loads = rates + ["max"]
    top = rates[-1]
    runs = read_runs(work)
    ttfb = {}
    for t in TARGETS + DIALECT_TARGETS:
        path = os.path.join(work, f"ttfb-{t}.json")
        if t in DIALECT_TARGETS and not os.path.exists(path):
            continue
        with open(path) as f:
            ttfb[t] = json.load(f)

    def run(t, m, l):
        return runs.get((t, m, l))

    lines = []
    w = lines.append
    w("# llm-proxy benchmark results")
    w("")
    w("Generated by `scripts/bench.sh` (see `bench/README.md`); do not edit by hand.")
    w("")
    w(f"- Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    w(f"- Machine: {machine()}")
    w(f"- Commit: {env.get('BENCH_COMMIT', 'unknown')}")
    w(
        f"- Runs: {seconds} s each with oha {env.get('BENCH_OHA_VERSION', '').replace('oha ', '')}, "
        f"{env.get('BENCH_CONNS')} connections at fixed rates ({', '.join(r + ' req/s' for r in rates)}), "
        f"{env.get('BENCH_MAX_CONNS')} (streamed: {env.get('BENCH_SSE_MAX_CONNS')}) at maximum throughput (no rate limit); "
        f"TTFB: {env.get('BENCH_TTFB_REQUESTS')} sequential streams on one keep-alive connection"
    )
    w(
        f"- Mock upstream: answers at once (delay {env.get('BENCH_DELAY_MS', '0')} ms); a stream is 4 SSE events, "
        f"{env.get('BENCH_CHUNK_DELAY_MS')} ms apart"
    )
    w(
        f"- nginx {env.get('BENCH_NGINX_VERSION', '')}: one worker, `proxy_pass` to a keep-alive upstream, "
        "`proxy_buffering off`, no access log"
    )
    w(
        "- llm-proxy: control plane (SQLite) + data plane processes, virtual-key auth, one assignment, "
        f"Redis limiter ({env.get('BENCH_REDIS_URL')}) with a limit that never rejects, RUST_LOG=warn"
    )
    w(
        "- /v1/responses (target llm-proxy-responses): the same data plane process after the Messages runs, "
        "an `openai` connection to the same mock, `{\"model\",\"input\"}` (`\"stream\":true` for streams) "
        "with a Bearer key, passed through with `model` rewritten and the response id tagged; the mock's "
        "stream is 9 Responses API events (`response.created` … `response.completed`) in chat's 4 writes; "
        f"loads as /v1/messages"
    )
    w(
        "- /v1/messages (target llm-proxy-messages): the same data plane process, right after its OpenAI chat "
        "runs, with an `anthropic` connection to the same mock and a second assignment on the same key; "
        "a small Claude Code-like body (`model`, `max_tokens`, one user message; `\"stream\":true` for "
        "streams) with `x-api-key` and `anthropic-version: 2023-06-01`, passed through with only `model` "
        "rewritten; the mock's stream is 7 Anthropic events (3 for OpenAI chat, plus `[DONE]`); "
        f"loads: {', '.join([r + ' req/s' for r in env.get('BENCH_MESSAGES_RATES', top).split()] + ['max'])}"
    )
    body_kibs = [int(k) for k in env.get("BENCH_BODY_KIB", "").split()]
    local = env.get("BENCH_LOCAL_LIMITER", "0") == "1"
    if body_kibs:
        w(
            f"- Request bodies: OpenAI chat at maximum throughput also with {' and '.join(f'{k} KiB' for k in body_kibs)} "
            "bodies (the user message padded), non-streamed and streamed, through nginx and the data plane; nginx "
            "keeps request bodies in memory (`client_body_buffer_size` above the largest)"
        )
    if local:
        w(
            "- In-process limiter (target llm-proxy-local): the same data plane binary restarted without "
            "`--redis-url` after every other data plane run, warmed up, then OpenAI chat at maximum throughput, "
            "every body size, both modes"
        )
    w(
        "- Pinning: the proxy (nginx's worker, or the data plane) on core 0; oha, the mock and the TTFB "
        "client on core 1; the control plane and Redis unpinned"
    )
    w("")
    w("Columns: latencies are oha's percentiles in ms (whole answer, streams included); **added** = "
      "through the proxy − direct to the mock at the same rate; **CPU/req** = the proxy's utime+stime "
      "(/proc/PID/stat) during the run ÷ requests answered; **core busy** = that CPU time ÷ wall time "
      "(1.00 = the proxy saturated its core; below that, at max throughput, the load generator's core "
      "was the limit); at fixed rates CPU/req includes a wake-up per request, the max-throughput rows show "
      "the saturated cost; **Redis CPU/req** = the local redis-server's CPU ÷ requests (the limiter's share, "
      "on either core); ratios are llm-proxy ÷ direct or ÷ nginx.")
    w("")

    # ---- targets ----
    w("## Targets")
    w("")
    checks = []
    # CPU per request at saturation, ÷ nginx's at the same body size and mode.
    for limiter, target, limit, label in [
        ("in-process buckets", "llm-proxy-local", CPU_LOCAL_MAX_RATIO, "maxl"),
        ("the Redis limiter", "llm-proxy", CPU_REDIS_MAX_RATIO, "maxr"),
    ]:
        g_max, n_max = run(target, "json", "max"), run("nginx", "json", "max")
        # Rounds of nginx then the data plane, back to back (bench.sh's latency rounds and
        # in-process phase): the median of their ratios is held to the budget.
        rounds = []
        for i in range(1, int(env.get("BENCH_LATENCY_ROUNDS", "0")) + 1):
            g_i, n_i = run(target, "json", f"{label}@{i}"), run("nginx", "json", f"{label}@{i}")
            if g_i and n_i and g_i["cpu_us"] and n_i["cpu_us"]:
                rounds.append((g_i["cpu_us"] / n_i["cpu_us"], g_i["cpu_us"], n_i["cpu_us"]))
        if rounds:
            r, g_us, n_us = sorted(rounds)[len(rounds) // 2]
            single = (
                f"; the single runs minutes apart: {g_max['cpu_us'] / n_max['cpu_us']:.2f}×"
                if g_max and n_max and g_max["cpu_us"] and n_max["cpu_us"]
                else ""
            )
            checks.append(
                (
                    r <= limit,
                    f"CPU/req (non-streamed, ~100 B, saturated) ≤ {limit}× nginx's with {limiter} "
                    f"(median of {len(rounds)} interleaved rounds): {g_us:.1f} vs {n_us:.1f} µs = {r:.2f}× "
                    f"(margin {limit - r:+.2f}×; rounds {', '.join(f'{x[0]:.2f}' for x in rounds)}{single})",
                )
            )
        elif g_max and n_max and g_max["cpu_us"] and n_max["cpu_us"]:
            r = g_max["cpu_us"] / n_max["cpu_us"]
            streamed = [run(target, "sse", "max"), run("nginx", "sse", "max")]
            also = (
                f"; streamed {streamed[0]['cpu_us'] / streamed[1]['cpu_us']:.2f}×"
                if all(x and x["cpu_us"] for x in streamed)
                else ""
            )
            checks.append(
                (
                    r <= limit,
                    f"CPU/req (non-streamed, ~100 B, saturated) ≤ {limit}× nginx's with {limiter}: "
                    f"{g_max['cpu_us']:.1f} vs {n_max['cpu_us']:.1f} µs = {r:.2f}× "
                    f"(margin {limit - r:+.2f}×{also})",
                )
            )
        else:
            checks.append((False, f"CPU/req ≤ {limit}× nginx's with {limiter}: not measured"))
    body_ratios = []
    for target in ["llm-proxy", "llm-proxy-local"]:
        for kib in body_kibs:
            for m in MODES:
                g_b, n_b = run(sized(target, kib), m, "max"), run(sized("nginx", kib), m, "max")
                if g_b and n_b and g_b["cpu_us"] and n_b["cpu_us"]:
                    body_ratios.append((g_b["cpu_us"] / n_b["cpu_us"], f"{kib} KiB {MODES[m]} {target}"))
    if body_ratios:
        worst, where = max(body_ratios)
        checks.append(
            (
                worst <= CPU_BODY_MAX_RATIO,
                f"CPU/req with {' and '.join(f'{k} KiB' for k in body_kibs)} bodies ≤ {CPU_BODY_MAX_RATIO}× nginx's "
                f"(both modes, both limiters; saturated): worst {worst:.2f}× ({where}; margin {CPU_BODY_MAX_RATIO - worst:+.2f}×)",
            )
        )
    else:
        checks.append((False, "CPU/req with 16 KiB and 128 KiB bodies: not measured (BENCH_BODY_KIB empty)"))
    # The latency budgets: the medians of the interleaved rounds (direct, nginx, llm-proxy back to
    # back) when bench.sh ran them, else the single runs of the main table.
    latency_rounds = []
    for i in range(1, int(env.get("BENCH_LATENCY_ROUNDS", "0")) + 1):
        d, n, g = (run(t, "json", f"{top}@{i}") for t in ("direct", "nginx", "llm-proxy"))
        t_n, t_g = (load_ttfb(work, f"{t}@{i}") for t in ("nginx", "llm-proxy"))
        if d and n and g and t_n and t_g:
            latency_rounds.append((d, n, g, t_n["ttfb_ms"], t_g["ttfb_ms"]))
    single = (run("direct", "json", top), run("nginx", "json", top), run("llm-proxy", "json", top))
    if latency_rounds:
        where = f"median of {len(latency_rounds)} interleaved rounds"

        def each(f):
            values = [f(*r) for r in latency_rounds]
            return statistics.median(values), ", ".join(f"{v:+.3f}" for v in values)
    elif all(single):
        where = "single runs"

        def each(f):
            value = f(*single, ttfb["nginx"]["ttfb_ms"], ttfb["llm-proxy"]["ttfb_ms"])
            return value, f"{value:+.3f}"
    else:
        each = None
    if each:
        (n_add50, _), (g_add50, _) = each(lambda d, n, g, *_: n["p50"] - d["p50"]), each(
            lambda d, n, g, *_: g["p50"] - d["p50"]
        )
        diff50, diffs50 = each(lambda d, n, g, *_: (g["p50"] - d["p50"]) - (n["p50"] - d["p50"]))
        checks.append(
            (
                diff50 <= ADDED_P50_MAX_DIFF_MS,
                f"Added median at {top} req/s within {ADDED_P50_MAX_DIFF_MS} ms of nginx's ({where}): llm-proxy "
                f"{g_add50:+.3f} ms, nginx {n_add50:+.3f} ms, difference {diff50:+.3f} ms (rounds {diffs50})",
            )
        )
        (n_add, _), (g_add, _) = each(lambda d, n, g, *_: n["p99"] - d["p99"]), each(
            lambda d, n, g, *_: g["p99"] - d["p99"]
        )
        margin, margins = each(lambda d, n, g, *_: (n["p99"] - d["p99"]) - (g["p99"] - d["p99"]))
        checks.append(
            (
                margin >= 0,
                f"Added p99 at {top} req/s no worse than nginx's ({where}): llm-proxy {g_add:+.3f} ms, "
                f"nginx {n_add:+.3f} ms (margin {margin:+.3f} ms; rounds {margins})",
            )
        )
        t_diff, t_diffs = each(lambda d, n, g, t_n, t_g: t_g["p50"] - t_n["p50"])
        (t_np50, _), (t_gp50, _) = each(lambda *r: r[3]["p50"]), each(lambda *r: r[4]["p50"])
        t_diff99, _ = each(lambda d, n, g, t_n, t_g: t_g["p99"] - t_n["p99"])
        checks.append(
            (
                t_diff <= TTFB_MAX_DIFF_MS,
                f"Streaming time to first byte within {TTFB_MAX_DIFF_MS} ms of nginx's (p50, {where}): llm-proxy "
                f"{t_gp50:.3f} ms, nginx {t_np50:.3f} ms, difference {t_diff:+.3f} ms "
                f"(margin {TTFB_MAX_DIFF_MS - t_diff:+.3f} ms; rounds {t_diffs}; p99 difference {t_diff99:+.3f} ms)",
            )
        )
    dialect_rows = {}  # target -> [(mode, load, chat run, dialect run)]
    dialect_rounds = {}  # target -> {mode: [CPU/req ratio of each interleaved round]}
    for target, route, _ in DIALECTS:
        rows = dialect_rows.setdefault(target, [])
        for m in MODES:
            for l in loads:
                c, a = run("llm-proxy", m, l), run(target, m, l)
                if c and a and c["cpu_us"] and a["cpu_us"] is not None:
                    rows.append((m, l, c, a))
        rounds = dialect_rounds.setdefault(target, {})
        for m in MODES:
            for i in range(1, int(env.get("BENCH_DIALECT_ROUNDS", "0")) + 1):
                c, a = run("llm-proxy", m, f"max@{i}"), run(target, m, f"max@{i}")
                if c and a and c["cpu_us"] and a["cpu_us"] is not None:
                    rounds.setdefault(m, []).append(a["cpu_us"] / c["cpu_us"])
        if all(rounds.get(m) for m in MODES):
            # Back-to-back rounds: the median of their ratios is the figure held to the target.
            medians = {m: statistics.median(rounds[m]) for m in MODES}
            parts = [
                f"{MODES[m]} {medians[m]:.2f}× (rounds {', '.join(f'{r:.2f}' for r in rounds[m])})"
                for m in MODES
            ]
            single = [f"{MODES[m]} {a['cpu_us'] / c['cpu_us']:.2f}×" for m, l, c, a in rows if l == "max"]
            worst = max(medians.values())
            checks.append(
                (
                    worst <= DIALECT_CPU_MAX_RATIO,
                    f"{route} passthrough CPU/req within {100 * (DIALECT_CPU_MAX_RATIO - 1):.0f}% of OpenAI chat "
                    f"(max throughput, same data plane, median of {len(rounds[next(iter(MODES))])} interleaved rounds): "
                    f"{'; '.join(parts)} (margin {100 * (DIALECT_CPU_MAX_RATIO - worst):+.0f}%"
                    + (f"; the single runs minutes apart: {', '.join(single)}" if single else "")
                    + ")",
                )
            )
            continue
        verdict_rows = [(m, c, a) for m, l, c, a in rows if l == "max"]
        if len(verdict_rows) == len(MODES):
            ratios = [a["cpu_us"] / c["cpu_us"] for _, c, a in verdict_rows]
            parts = [
                f"{MODES[m]} {a['cpu_us']:.1f} vs {c['cpu_us']:.1f} µs = {a['cpu_us'] / c['cpu_us']:.2f}×"
                for m, c, a in verdict_rows
            ]
            fixed = [f"{MODES[m]} {a['cpu_us'] / c['cpu_us']:.2f}×" for m, l, c, a in rows if l != "max"]
            checks.append(
                (
                    max(ratios) <= DIALECT_CPU_MAX_RATIO,
                    f"{route} passthrough CPU/req within {100 * (DIALECT_CPU_MAX_RATIO - 1):.0f}% of OpenAI chat "
                    f"(non-streamed, streamed; max throughput, same data plane): {'; '.join(parts)} "
                    f"(margin {100 * (DIALECT_CPU_MAX_RATIO - max(ratios)):+.0f}%"
                    + (f"; at {top} req/s: {', '.join(fixed)}" if fixed else "")
                    + ")",
                )
            )
        else:
            checks.append((False, f"{route} passthrough CPU/req within 10% of OpenAI chat: not measured"))
    scale = read_env_file(os.path.join(work, "scale.env"))
    scale_keys = int(env.get("BENCH_SCALE_KEYS", "0"))
    peak_keys = None
    if scale:
        peak_keys = max(int(v) for k, v in scale.items() if k.endswith("hwm_kib")) / MIB
        checks.append(
            (
                peak_keys <= SCALE_RSS_MAX_MIB,
                f"Data plane peak RSS ≤ {SCALE_RSS_MAX_MIB:.0f} MiB with a {scale_keys // 1000}k-key snapshot "
                f"(VmHWM, including one update): {peak_keys:.1f} MiB (margin {SCALE_RSS_MAX_MIB - peak_keys:+.1f} MiB)",
            )
        )
    else:
        checks.append((False, "Data plane peak RSS with a 100k-key snapshot: not measured (BENCH_SCALE_KEYS=0)"))
    dp_hwm = env.get("BENCH_DP_HWM_KIB")
    if dp_hwm:
        mib = int(dp_hwm) / MIB
        checks.append(
            (
                mib <= LOAD_RSS_MAX_MIB,
                f"Data plane ≤ {LOAD_RSS_MAX_MIB:.0f} MiB RSS under load (VmHWM after the OpenAI chat load runs): "
                f"{mib:.1f} MiB (margin {LOAD_RSS_MAX_MIB - mib:+.1f} MiB)",
            )
        )
    w(f"DESIGN §15's budgets, each judged against nginx in this run ({sum(ok for ok, _ in checks)} of {len(checks)} met):")
    w("")
    for ok, text in checks:
        w(f"- {verdict(ok)} {text}")
    w("")
    g_max, n_max = run("llm-proxy", "json", "max"), run("nginx", "json", "max")
    if g_max and n_max:
        w(
            f"For reference, maximum throughput (non-streamed, Redis limiter): {g_max['rps']:.0f} vs nginx's "
            f"{n_max['rps']:.0f} req/s = {g_max['rps'] / n_max['rps']:.2f}× (core busy: llm-proxy "
            f"{fmt(g_max['busy'], 2)}, nginx {fmt(n_max['busy'], 2)}: nginx's worker does not saturate its core, "
            "the load generator's does)."
        )
        w("")
    slow = [
        (t, m, l, r)
        for (t, m, l), r in sorted(runs.items())
        if not l.startswith("max") and r["rps"] < UNDER_RATE * float(l.split("@")[0])
    ]
    for t, m, l, r in slow:
        w(
            f"- ⚠ {t}, {MODES.get(m, m)} at {l} req/s answered only {r['rps']:.0f} req/s "
            f"({100 * r['rps'] / float(l.split('@')[0]):.0f}%, p50 {r['p50']:.1f} ms with {r['conns']} connections): "
            "its latencies are not comparable at that rate"
        )
    if slow:
        w("")
    w("")

    # ---- runs ----
    w("## Runs")
    w("")
    rows = []
    for m, mode_name in MODES.items():
        for l in loads:
            for t in TARGETS + DIALECT_TARGETS:
                r = run(t, m, l)
                if not r:
                    continue
                rows.append(
                    [
                        mode_name,
                        load_name(l),
                        t,
                        r["conns"],
                        f"{r['rps']:.0f}",
                        fmt(r["p50"]),
                        fmt(r["p90"]),
                        fmt(r["p99"]),
                        fmt(r["cpu_us"], 1) if r["cpu_us"] is not None else "–",
                        fmt(r["busy"], 2) if r["busy"] is not None else "–",
                        fmt(r["redis_us"], 1) if r["redis_us"] is not None else "–",
                    ]
                )
    w(
        table(
            ["mode", "load", "target", "conns", "req/s", "p50 ms", "p90 ms", "p99 ms", "CPU/req µs", "core busy", "Redis CPU/req µs"],
            rows,
        )
    )
    w("")

    # ---- ratios ----
    w("## Ratios (llm-proxy ÷ direct, llm-proxy ÷ nginx)")
    w("")
    rows = []
    for m, mode_name in MODES.items():
        for l in loads:
            d, n, g = run("direct", m, l), run("nginx", m, l), run("llm-proxy", m, l)
            if not (d and n and g):
                continue
            row = [mode_name, load_name(l), ratio(g["rps"], d["rps"]), ratio(g["rps"], n["rps"])]
            for q in ("p50", "p90", "p99"):
                row += [ratio(g[q], d[q]), ratio(g[q], n[q])]
            row.append(ratio(g["cpu_us"], n["cpu_us"]))
            rows.append(row)
    w(
        table(
            [
                "mode",
                "load",
                "req/s ÷ direct",
                "req/s ÷ nginx",
                "p50 ÷ direct",
                "p50 ÷ nginx",
                "p90 ÷ direct",
                "p90 ÷ nginx",
                "p99 ÷ direct",
                "p99 ÷ nginx",
                "CPU/req ÷ nginx",
            ],
            rows,
        )
    )
    w("")

    # ---- CPU/req vs nginx, context switches and syscalls, allocations ----
    cpu_vs_nginx(w, run, body_kibs, local)
    syscalls_table(w, runs)
    allocs_section(w, work, env)

    # ---- other dialects ----
    for target, route, stream_events in DIALECTS:
        interleaved = [
            (m, i, run("llm-proxy", m, f"max@{i}"), run(target, m, f"max@{i}"))
            for m in MODES
            for i in range(1, int(env.get("BENCH_DIALECT_ROUNDS", "0")) + 1)
        ]
        interleaved = [(m, i, c, a) for m, i, c, a in interleaved if c and a and c["cpu_us"] and a["cpu_us"] is not None]
        dialect_table(w, route, stream_events, dialect_rows[target], interleaved)

    # ---- A/B ----
    ab_rounds = int(env.get("BENCH_AB_ROUNDS", "0"))
    if ab_rounds:
        w("## A/B: data plane B ÷ A (OpenAI chat, maximum throughput, back to back)")
        w("")
        w(f"A: `{env.get('BENCH_AB_DP', '?')}`; B: the data plane of this commit. Each round starts A, "
          "warms it up and runs both modes, then does the same with B, on the same control plane, mock and port.")
        w("")
        rows = []
        ratios = {m: [] for m in MODES}
        for m in MODES:
            for i in range(1, ab_rounds + 1):
                a, b = run("ab-A", m, f"max@{i}"), run("ab-B", m, f"max@{i}")
                if not (a and b and a["cpu_us"] and b["cpu_us"] is not None):
                    continue
                ratios[m].append(b["cpu_us"] / a["cpu_us"])
                rows.append([MODES[m], str(i), f"{a['rps']:.0f}", f"{b['rps']:.0f}", fmt(a["cpu_us"], 1),
                             fmt(b["cpu_us"], 1), ratio(b["cpu_us"], a["cpu_us"], 3)])
        w(table(["mode", "round", "A req/s", "B req/s", "A CPU/req µs", "B CPU/req µs", "B ÷ A"], rows))
        w("")
        for m, values in ratios.items():
            if values:
                median = sorted(values)[len(values) // 2]
                w(f"- {MODES[m]}: median B ÷ A CPU/req {median:.3f} over {len(values)} rounds")
        w("")

    # ---- usage accounting ----
    usage = read_env_file(os.path.join(work, "usage.env"))
    if usage:
        w("## Usage accounting (DESIGN §18)")
        w("")
        w(f"After every data plane run above (each shipped its usage at SIGTERM): `usage_hourly` holds "
          f"{usage.get('usage_rows')} rows for {usage.get('usage_requests')} requests "
          f"({usage.get('usage_pairs')} key × assignment pairs × {usage.get('usage_hours')} hour buckets): "
          "the table grows with keys × assignments × hours, not with requests.")
        w("")

    # ---- added latency ----
    w("## Added latency (proxy − direct, ms; fixed rates)")
    w("")
    rows = []
    for m, mode_name in MODES.items():
        for l in rates:
            d, n, g = run("direct", m, l), run("nginx", m, l), run("llm-proxy", m, l)
            if not (d and n and g):
                continue
            row = [mode_name, load_name(l)]
            row += [fmt(n[q] - d[q], signed=True) for q in ("p50", "p90", "p99")]
            row += [fmt(g[q] - d[q], signed=True) for q in ("p50", "p90", "p99")]
            row += [added_ratio(g[q] - d[q], n[q] - d[q]) for q in ("p50", "p90", "p99")]
            rows.append(row)
    w(
        table(
            [
                "mode",
                "load",
                "nginx p50",
                "nginx p90",
                "nginx p99",
                "llm-proxy p50",
                "llm-proxy p90",
                "llm-proxy p99",
                "÷ nginx p50",
                "÷ nginx p90",
                "÷ nginx p99",
            ],
            rows,
        )
    )
    w("")
    w(
        f"A ratio of added latencies is unstable when nginx's is close to zero (n/a below {MIN_ADDED_MS} ms); "
        "read the differences too."
    )
    w("")

    # ---- TTFB ----
    w("## Streaming time to first byte (ms)")
    w("")
    w("From writing the request to the first bytes of the SSE body (headers excluded), and to the end of "
      "the stream; sequential requests on one connection, no other load.")
    w("")
    rows = []
    for t in [t for t in TARGETS + DIALECT_TARGETS if t in ttfb]:
        a, b = ttfb[t]["ttfb_ms"], ttfb[t]["total_ms"]
        rows.append([t, fmt(a["p50"]), fmt(a["p90"]), fmt(a["p99"]), fmt(b["p50"]), fmt(b["p99"])])
    for t in ("nginx", "llm-proxy"):
        a, base = ttfb[t]["ttfb_ms"], ttfb["direct"]["ttfb_ms"]
        rows.append([f"{t} − direct", *(fmt(a[q] - base[q], signed=True) for q in ("p50", "p90", "p99")), "", ""])
    a, base = ttfb["llm-proxy"]["ttfb_ms"], ttfb["nginx"]["ttfb_ms"]
    rows.append(["llm-proxy − nginx", *(fmt(a[q] - base[q], signed=True) for q in ("p50", "p90", "p99")), "", ""])
    for t in [t for t in DIALECT_TARGETS if t in ttfb]:
        a, base = ttfb[t]["ttfb_ms"], ttfb["llm-proxy"]["ttfb_ms"]
        rows.append([f"{t} − llm-proxy", *(fmt(a[q] - base[q], signed=True) for q in ("p50", "p90", "p99")), "", ""])
    w(table(["target", "TTFB p50", "TTFB p90", "TTFB p99", "total p50", "total p99"], rows))
    w("")

    # ---- memory ----
    w("## Peak memory")
    w("")
    rows = []
    if env.get("BENCH_NGINX_HWM_KIB"):
        rows.append(["nginx worker, after all load runs", f"{int(env['BENCH_NGINX_HWM_KIB']) / MIB:.1f}"])
    if dp_hwm:
        rows.append(["llm-proxy data plane, after the OpenAI chat load runs", f"{int(dp_hwm) / MIB:.1f}"])
    if scale:
        rows.append([f"llm-proxy data plane, {scale_keys // 1000}k-key snapshot (incl. one update)", f"{peak_keys:.1f}"])
    w(table(["process", "VmHWM MiB"], rows))
    w("")

    # ---- config scale ----
    w("## Config scale")
    w("")
    if not scale:
        w("Skipped (BENCH_SCALE_KEYS=0).")
    else:
        built = log_lines(os.path.join(work, "cp-scale.log"), "config snapshot built", scale_keys)
        applied = log_lines(os.path.join(work, "dp-scale.log"), "config snapshot applied", scale_keys)
        r = run("scale", "json", top)

        def field(events, i, name, digits=1):
            if len(events) <= i or events[i].get(name) is None:
                return "n/a"
            v = events[i][name]
            return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

        def kib(name):
            return f"{int(scale[name]) / MIB:.1f}" if name in scale else "n/a"

        sizes = (
            f"{field(applied, 0, 'virtual_keys')} keys, {field(applied, 0, 'assignments')} assignments, "
            f"{field(applied, 0, 'models')} models"
        )
        w(f"{scale_keys} keys × 3 assignments written straight into the control plane's SQLite database "
          f"(snapshot with the benchmark's own: {sizes}); then one admin write (a new key) while both planes "
          "run, for the update column.")
        w("")
        rows = [
            ["control plane: snapshot build (`config snapshot built` build_ms)", field(built, 0, "build_ms"), field(built, 1, "build_ms")],
            ["transfer size (`config snapshot applied` bytes)", field(applied, 0, "bytes"), field(applied, 1, "bytes")],
            ["data plane: index build (`config snapshot applied` build_ms)", field(applied, 0, "build_ms"), field(applied, 1, "build_ms")],
            ["data plane: swap (`config snapshot applied` swap_us)", field(applied, 0, "swap_us"), field(applied, 1, "swap_us")],
            ["data plane VmRSS MiB after apply", kib("applied_rss_kib"), kib("update_rss_kib")],
            ["data plane VmHWM MiB after apply", kib("applied_hwm_kib"), kib("update_hwm_kib")],
            [f"data plane VmRSS / VmHWM MiB after {seconds} s at {top} req/s", f"{kib('loaded_rss_kib')} / {kib('loaded_hwm_kib')}", ""],
        ]
        if r:
            rows.append([f"latency at {top} req/s (non-streamed, one of the 100k keys): p50 / p99 ms", f"{r['p50']:.3f} / {r['p99']:.3f}", ""])
            rows.append(["data plane CPU/req µs at that rate", fmt(r["cpu_us"], 1) if r["cpu_us"] is not None else "n/a", ""])
        w(table(["", "first snapshot", "update"], rows))
    w("")
    return "\n".join(lines)


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "check" and len(sys.argv) == 3:
        check(sys.argv[2])
    elif cmd == "log-line" and len(sys.argv) == 5:
        log_line(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "report" and len(sys.argv) == 3:
        sys.stdout.write(report(sys.argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
