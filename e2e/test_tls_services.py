"""TLS to Postgres and to Redis with the real binaries (DESIGN §19 "TLS everywhere it is offered").

`scripts/tls-services.sh` starts a Postgres that refuses every connection without TLS and a Redis
that listens only on its TLS port, both with a certificate from a private CA. Against them:

a. the control plane with each Postgres URL form of the README's "Production TLS" section
   (`sslmode=require`; `sslmode=verify-full&sslrootcert=`; a client certificate) becomes ready, its
   LISTEN session runs over TLS, and a change made through it reaches a data plane that shares
   its buckets through `rediss://` + `LLM_PROXY_REDIS_CA_FILE`: a rate-limited request leaves its
   bucket in the TLS Redis, and the 429 is Redis' decision (no fail-mode answer, no Redis error);
b. `llmctl serve` does the same with `--database-url` and `--redis-url` + `--redis-ca-file`;
c. `verify-full` against the wrong CA, or with a host name the certificate does not name, fails
   with a message saying so (and never the password); `rediss://` with the wrong CA leaves the data
   plane serving in its fail mode, with a warning naming the certificate error and the Redis error
   metrics up, and nothing written to Redis;
d. `verify-ca`, and `require` with `sslrootcert` (as in libpq), check the chain but not the host
   name;
e. `check-config` rejects a bad `sslmode`, an unreadable `sslrootcert` and an unreadable
   `--redis-ca-file` without connecting.

The test skips only when a tool the script needs is not installed. Synchronisation is by polling
with deadlines; nothing asserts on timing."""

import base64
import contextlib
import glob
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from mock_upstream import MOCK_BIN, mock_upstream

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "tls-services.sh"
README = ROOT / "README.md"
DEFAULT_BIN_DIR = ROOT / "target" / "debug"
BIN_DIR = Path(os.environ.get("BIN_DIR", DEFAULT_BIN_DIR))
PATIENCE_S = 60

# The URL forms under test. README.md's "Production TLS" section shows each of them with the
# placeholders of README_VALUES (test_readme_shows_the_tested_url_forms holds it to that).
PG_FORMS = {
    "require": "postgres://{user}:{password}@{host}:{port}/{db}?sslmode=require",
    "verify-full": "postgres://{user}:{password}@{host}:{port}/{db}?sslmode=verify-full&sslrootcert={ca}",
    "client-cert": "postgres://{user}@{host}:{port}/{db}?sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key}",
}
REDIS_FORM = "rediss://:{password}@{host}:{port}"
REDIS_CA_ENV = "LLM_PROXY_REDIS_CA_FILE"
README_VALUES = {
    "pg": dict(user="llmproxy", password="PW", host="db.internal", port=5432, db="llmproxy",
               ca="/etc/llm-proxy/db-ca/ca.crt", cert="/etc/llm-proxy/db-client/tls.crt",
               key="/etc/llm-proxy/db-client/tls.key"),
    "redis": dict(password="PW", host="redis.internal", port=6380),
    "redis_ca": "/etc/llm-proxy/redis-ca/ca.crt",
}

# The OpenAI key the mock upstream accepts (the mock-upstream crate's openai::OPENAI_KEY).
UPSTREAM_KEY = "sk-upstream-openai-0123456789"


def poll(what, check, timeout=PATIENCE_S, interval=0.05):
    """Calls check() until it returns something truthy (returned); fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_tools():
    missing = [t for t in ("openssl", "psql", "redis-server", "redis-cli", "ss") if not shutil.which(t)]
    pg_bins = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.access(f"{d}/initdb", os.X_OK)]
    if not (shutil.which("initdb") and shutil.which("pg_ctl")) and not pg_bins:
        missing.append("initdb/pg_ctl (PostgreSQL server)")
    return missing


def ensure_binaries():
    needed = [BIN_DIR / name for name in ("llm-proxy-control-plane", "llm-proxy-data-plane", "llmctl")] + [MOCK_BIN]
    if all(p.exists() for p in needed):
        return
    if BIN_DIR != DEFAULT_BIN_DIR or not shutil.which("cargo"):
        pytest.fail(f"missing {[str(p) for p in needed if not p.exists()]}: run `cargo build --bins`")
    subprocess.run(["cargo", "build", "-q", "--bins"], cwd=ROOT, check=True, timeout=900)


class Services:
    """What tls-services.sh started: ports, passwords, certificate paths."""

    def __init__(self, env, upstream_url, scratch):
        self.env = env
        self.upstream_url = upstream_url
        self.scratch = scratch

    def pg_url(self, form, db, host="localhost", ca=None, user=None):
        return PG_FORMS[form].format(
            user=user or (self.env["PG_CERT_USER"] if form == "client-cert" else self.env["PG_USER"]),
            password=self.env["PG_PASSWORD"], host=host, port=self.env["PG_PORT"], db=db,
            ca=ca or self.env["TLS_CA"], cert=self.env["TLS_CLIENT_CERT"], key=self.env["TLS_CLIENT_KEY"])

    def redis_url(self):
        return REDIS_FORM.format(password=self.env["REDIS_PASSWORD"], host="localhost", port=self.env["REDIS_PORT"])

    def psql(self, sql, db="llmproxy"):
        """Runs SQL through libpq over verified TLS (the same URL form as the control plane's)."""
        out = subprocess.run(["psql", self.pg_url("verify-full", db), "-AtqX", "-v", "ON_ERROR_STOP=1", "-c", sql],
                             capture_output=True, text=True, timeout=PATIENCE_S)
        assert out.returncode == 0, f"psql {sql!r}: {out.stderr}"
        return out.stdout.strip()

    def new_database(self):
        """A fresh database (each control plane here brings its own master key)."""
        name = f"t_tls_{secrets.token_hex(4)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def redis(self, *args, ca=None):
        out = subprocess.run(["redis-cli", "--tls", "--cacert", ca or self.env["TLS_CA"], "-h", "localhost",
                              "-p", self.env["REDIS_PORT"], *args],
                             capture_output=True, text=True, timeout=PATIENCE_S,
                             env=dict(os.environ, REDISCLI_AUTH=self.env["REDIS_PASSWORD"]))
        assert out.returncode == 0, f"redis-cli {args}: {out.stderr}"
        return out.stdout.strip()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    missing = missing_tools()
    if missing:
        pytest.skip(f"scripts/tls-services.sh needs {', '.join(missing)}, not installed here")
    ensure_binaries()
    state = tmp_path_factory.mktemp("tls-services")
    with mock_upstream() as upstream:
        started = subprocess.run([str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=180)
        try:
            assert started.returncode == 0, f"tls-services.sh start failed:\n{started.stdout}\n{started.stderr}"
            env = {}
            for line in (state / "tls-services.env").read_text().splitlines():
                key, value = line.split("=", 1)
                env[key] = " ".join(shlex.split(value))
            yield Services(env, upstream.url, state)
        finally:
            stopped = subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, f"tls-services.sh stop failed:\n{stopped.stdout}\n{stopped.stderr}"


class Process:
    """A binary started with its output in a file (never a pipe nobody reads)."""

    def __init__(self, name, args, env, scratch):
        self.log_path = scratch / f"{name}-{secrets.token_hex(3)}.log"
        self._log = open(self.log_path, "w")
        # Plain-text logs at info, whatever the caller's environment says: the tests read them.
        base = {k: v for k, v in os.environ.items() if k not in ("RUST_LOG", "LLM_PROXY_LOG_FORMAT")}
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     env=dict(base, RUST_LOG="info", **env))

    def log(self):
        return self.log_path.read_text(errors="replace")

    def exited(self):
        return self.proc.poll() is not None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@contextlib.contextmanager
def running(name, args, env, scratch):
    process = Process(name, args, env, scratch)
    try:
        yield process
    finally:
        process.stop()


def ready(url):
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ready(process, url):
    def check():
        assert not process.exited(), f"exited while starting:\n{process.log()}"
        return ready(url)
    poll(f"{url} to answer 200", check)


def master_key():
    return base64.b64encode(secrets.token_bytes(64)).decode()


@contextlib.contextmanager
def control_plane(services, database_url):
    grpc, metrics = free_port(), free_port()
    args = [str(BIN_DIR / "llm-proxy-control-plane"), "serve", "--listen", f"127.0.0.1:{grpc}",
            "--metrics-listen", f"127.0.0.1:{metrics}"]
    with running("cp", args, {"DATABASE_URL": database_url, "LLM_PROXY_MASTER_KEY": master_key()},
                 services.scratch) as cp:
        cp.grpc_url = f"http://127.0.0.1:{grpc}"
        cp.readyz = f"http://127.0.0.1:{metrics}/readyz"
        yield cp


@contextlib.contextmanager
def data_plane(services, control_plane_url, redis_ca):
    api, metrics = free_port(), free_port()
    args = [str(BIN_DIR / "llm-proxy-data-plane"), "--listen", f"127.0.0.1:{api}",
            "--metrics-listen", f"127.0.0.1:{metrics}", "--control-plane", control_plane_url]
    # The 429 below must be Redis' decision: a call over the default 5 ms budget on a loaded
    # machine running debug builds would be answered by the fail mode instead.
    env = {"REDIS_URL": services.redis_url(), REDIS_CA_ENV: redis_ca,
           "LLM_PROXY_RATELIMIT_REDIS_BUDGET_MS": "500"}
    with running("dp", args, env, services.scratch) as dp:
        dp.api_url = f"http://127.0.0.1:{api}"
        dp.metrics_url = f"http://127.0.0.1:{metrics}"
        yield dp


def llmctl(grpc_url, *args):
    out = subprocess.run([str(BIN_DIR / "llmctl"), "--server", grpc_url, "-o", "json", *args],
                         capture_output=True, text=True, timeout=PATIENCE_S)
    assert out.returncode == 0, f"llmctl {args}: {out.stderr}"
    return json.loads(out.stdout) if out.stdout.strip() else None


def configure(services, grpc_url, tps=1, burst=2):
    """A connection to the mock upstream, a model, a key and a rate-limited assignment.
    Returns (key, alias, assignment id)."""
    key = f"vk-tls-{secrets.token_hex(12)}"
    llmctl(grpc_url, "connection", "add", "--name", "Mock", "--provider", "openai",
           "--endpoint", services.upstream_url, "--api-key", UPSTREAM_KEY)
    llmctl(grpc_url, "model", "add", "--conn-id", "Mock", "--name", "mock-model", "--remote", "gpt-4o-mini")
    llmctl(grpc_url, "vkey", "add", "--name", "TLS", "--key", key)
    assignment = llmctl(grpc_url, "assign", "--vkey-id", "TLS", "--model-id", "mock-model", "--alias", "limited",
                        "--tps", str(tps), "--burst", str(burst))
    return key, "limited", assignment["id"]


def aliases(api_url, key):
    try:
        r = httpx.get(f"{api_url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=5)
    except httpx.HTTPError:
        return set()
    return {m["id"] for m in r.json()["data"]} if r.status_code == 200 else set()


def chat(api_url, key, alias):
    return httpx.post(f"{api_url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": alias, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)


def metric(metrics_url, name):
    """The value of an unlabelled sample, or None when the metric is absent."""
    for line in httpx.get(f"{metrics_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return None


def until_limited(api_url, key, alias):
    """Sends requests until one is refused with 429; returns the statuses (a bounded number: the
    bucket holds `burst` requests and refills at 1/s)."""
    statuses = []
    for _ in range(20):
        statuses.append(chat(api_url, key, alias).status_code)
        if statuses[-1] == 429:
            return statuses
    pytest.fail(f"never rate limited: {statuses}")


def assert_listen_session_over_tls(services, db):
    """The control plane's LISTEN session (config notifications) is up, and over TLS."""
    sql = ("SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
           f"WHERE a.datname = '{db}' AND a.query = 'LISTEN llm_proxy_config'")
    poll("the LISTEN session", lambda: services.psql(sql) == "t")


@pytest.mark.parametrize("form", list(PG_FORMS))
def test_planes_run_on_tls_postgres_and_tls_redis(services, form):
    db = services.new_database()
    with control_plane(services, services.pg_url(form, db)) as cp:
        wait_ready(cp, cp.readyz)
        assert_listen_session_over_tls(services, db)
        with data_plane(services, cp.grpc_url, services.env["TLS_CA"]) as dp:
            key, alias, asg = configure(services, cp.grpc_url)
            # The change reached the data plane (through the database and the config stream).
            poll("the data plane to serve the alias", lambda: alias in aliases(dp.api_url, key))
            statuses = until_limited(dp.api_url, key, alias)
            assert statuses[0] == 200, statuses
            # The bucket lives in the TLS Redis, and Redis (not the fail mode) decided.
            assert services.redis("EXISTS", f"llmproxy:{{{asg}}}:rps") == "1"
            assert metric(dp.metrics_url, "llm_proxy_redis_errors_total") == 0
            assert metric(dp.metrics_url, "llm_proxy_ratelimit_fallback_decisions_total") == 0
            assert metric(dp.metrics_url, "llm_proxy_ratelimit_degraded") == 0


def test_llmctl_serve_on_tls_postgres_and_tls_redis(services):
    db = services.new_database()
    api, grpc, metrics = free_port(), free_port(), free_port()
    args = [str(BIN_DIR / "llmctl"), "serve", "--data-dir", str(services.scratch / f"serve-{db}"),
            "--listen", f"127.0.0.1:{api}", "--grpc-listen", f"127.0.0.1:{grpc}",
            "--metrics-listen", f"127.0.0.1:{metrics}", "--database-url", services.pg_url("verify-full", db),
            "--redis-url", services.redis_url(), "--redis-ca-file", services.env["TLS_CA"]]
    with running("serve", args, {}, services.scratch) as serve:
        api_url, grpc_url = f"http://127.0.0.1:{api}", f"http://127.0.0.1:{grpc}"
        # `llmctl serve` is ready once the database answers and the first snapshot is applied.
        wait_ready(serve, f"http://127.0.0.1:{metrics}/readyz")
        assert_listen_session_over_tls(services, db)
        key, alias, asg = configure(services, grpc_url)
        poll("the data plane to serve the alias", lambda: alias in aliases(api_url, key))
        assert chat(api_url, key, alias).status_code == 200
        # Each admitted request charges the bucket in Redis (its default 5 ms budget may send a
        # call to the fail mode on a loaded machine, so the key is awaited, not assumed).
        def bucket_in_redis():
            if services.redis("EXISTS", f"llmproxy:{{{asg}}}:rps") == "1":
                return True
            assert chat(api_url, key, alias).status_code in (200, 429)
            return False
        poll("the bucket in the TLS Redis", bucket_in_redis)


def expect_failure(process, *needles):
    """Waits until the process has said all of NEEDLES (it may exit, or keep retrying); returns its log."""
    def said():
        exited = process.exited()
        text = process.log()
        if all(n in text for n in needles):
            return text
        assert not exited, f"exited without saying {needles}:\n{text}"
        return None
    return poll(f"the error {needles}", said)


@pytest.mark.parametrize("case", ["wrong-ca", "wrong-host"])
def test_verify_full_refuses_a_certificate_it_cannot_trust(services, case):
    db = services.new_database()
    if case == "wrong-ca":
        url = services.pg_url("verify-full", db, ca=services.env["TLS_OTHER_CA"])
        needles = ("invalid peer certificate: UnknownIssuer", f"sslrootcert={services.env['TLS_OTHER_CA']}")
    else:
        # The server is reached at 127.0.0.1 (hostaddr) but its certificate is checked against a
        # name it does not carry.
        url = services.pg_url("verify-full", db, host="wrong-host.invalid") + "&hostaddr=127.0.0.1"
        needles = ('certificate not valid for name "wrong-host.invalid"', "sslmode=verify-full")
    with control_plane(services, url) as cp:
        log = expect_failure(cp, "error performing TLS handshake", *needles)
        assert not ready(cp.readyz)
        assert services.env["PG_PASSWORD"] not in log


def migrate(url):
    return subprocess.run([str(BIN_DIR / "llm-proxy-control-plane"), "migrate"], capture_output=True, text=True,
                          timeout=PATIENCE_S, env=dict(os.environ, DATABASE_URL=url))


def test_verify_ca_and_require_with_a_root_file_check_the_chain_only(services):
    db = services.new_database()
    wrong_host = services.pg_url("verify-full", db, host="wrong-host.invalid") + "&hostaddr=127.0.0.1"
    # verify-ca: the chain leads to the CA, the host name is not compared.
    out = migrate(wrong_host.replace("sslmode=verify-full", "sslmode=verify-ca"))
    assert out.returncode == 0, out.stderr
    # require + sslrootcert checks the chain, as libpq does: the wrong CA is refused ...
    with_other_ca = services.pg_url("require", db) + f"&sslrootcert={services.env['TLS_OTHER_CA']}"
    out = migrate(with_other_ca)
    assert out.returncode == 1 and "invalid peer certificate: UnknownIssuer" in out.stderr, out.stderr
    assert services.env["PG_PASSWORD"] not in out.stderr
    # ... and the right one accepted, whatever the host name.
    out = migrate(wrong_host.replace("sslmode=verify-full", "sslmode=require"))
    assert out.returncode == 0, out.stderr


def test_rediss_with_the_wrong_ca_falls_back_and_says_why(services):
    db = services.new_database()
    with control_plane(services, services.pg_url("verify-full", db)) as cp:
        wait_ready(cp, cp.readyz)
        with data_plane(services, cp.grpc_url, services.env["TLS_OTHER_CA"]) as dp:
            key, alias, asg = configure(services, cp.grpc_url, tps=1000, burst=1000)
            poll("the data plane to serve the alias", lambda: alias in aliases(dp.api_url, key))
            # Requests are served by the `local` fail mode while every Redis call fails; after a run
            # of failures the breaker opens and the operator is told why.
            def warned():
                assert chat(dp.api_url, key, alias).status_code == 200
                text = dp.log()
                return "Redis unavailable" in text and "UnknownIssuer" in text
            poll("the warning about Redis", warned)
            assert metric(dp.metrics_url, "llm_proxy_redis_errors_total") > 0
            assert metric(dp.metrics_url, "llm_proxy_ratelimit_fallback_decisions_total") > 0
            assert metric(dp.metrics_url, "llm_proxy_ratelimit_degraded") == 1
            assert services.redis("EXISTS", f"llmproxy:{{{asg}}}:rps") == "0"
            assert services.env["REDIS_PASSWORD"] not in dp.log()


def check_config(args, env):
    return subprocess.run(args, capture_output=True, text=True, timeout=PATIENCE_S,
                          env=dict(os.environ, LLM_PROXY_MASTER_KEY=master_key(), **env))


def test_check_config_validates_tls_settings_without_connecting(services, tmp_path):
    cp = [str(BIN_DIR / "llm-proxy-control-plane"), "check-config", "--listen", "127.0.0.1:0"]
    password = services.env["PG_PASSWORD"]
    good = services.pg_url("verify-full", "llmproxy")
    ok = check_config(cp, {"DATABASE_URL": good})
    assert ok.returncode == 0, ok.stderr
    assert f"database=postgres sslmode=verify-full/sslrootcert={services.env['TLS_CA']}" in ok.stdout
    for url, needle in [
        (services.pg_url("require", "llmproxy").replace("sslmode=require", "sslmode=bogus"),
         "invalid database-url: sslmode=bogus is not one of disable, prefer, require, verify-ca, verify-full"),
        (services.pg_url("verify-full", "llmproxy", ca=str(tmp_path / "missing.pem")),
         f"invalid database-url: sslrootcert={tmp_path / 'missing.pem'}: "),
        (good + "&sslcert=/c.pem", "invalid database-url: sslcert and sslkey must be given together"),
    ]:
        out = check_config(cp, {"DATABASE_URL": url})
        assert out.returncode == 1 and needle in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and password not in out.stderr, out.stderr

    dp = [str(BIN_DIR / "llm-proxy-data-plane"), "--check-config"]
    ok = check_config(dp, {"REDIS_URL": services.redis_url(), REDIS_CA_ENV: services.env["TLS_CA"]})
    assert ok.returncode == 0 and "ratelimit=rediss+ca-file" in ok.stdout, ok.stderr
    for env, needle in [
        ({"REDIS_URL": services.redis_url(), REDIS_CA_ENV: str(tmp_path / "missing.pem")},
         f"--redis-ca-file {tmp_path / 'missing.pem'}: "),
        ({"REDIS_URL": services.redis_url().replace("rediss://", "redis://"), REDIS_CA_ENV: services.env["TLS_CA"]},
         "it needs a rediss:// URL"),
    ]:
        out = check_config(dp, env)
        assert out.returncode == 1 and needle in out.stderr, out.stderr
        assert services.env["REDIS_PASSWORD"] not in out.stderr, out.stderr


def test_readme_shows_the_tested_url_forms():
    readme = README.read_text()
    for form, template in PG_FORMS.items():
        url = template.format(**README_VALUES["pg"])
        assert url in readme, f"README lacks the {form} form: {url}"
    assert REDIS_FORM.format(**README_VALUES["redis"]) in readme
    assert f"{REDIS_CA_ENV}={README_VALUES['redis_ca']}" in readme
