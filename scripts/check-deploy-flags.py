#!/usr/bin/env python3
"""Check that the deployment files start the binaries with flags and env vars they accept.

For every container that runs llm-proxy-control-plane or llm-proxy-data-plane in
  - the Helm chart rendered with its default values and each charts/llm-proxy/ci/*-values.yaml,
  - docker-compose.yml, when it exists (else skipped with a message),
this takes the container's arguments and environment and runs the real binary in its check-config
mode (`llm-proxy-control-plane check-config ARGS`, `llm-proxy-data-plane ARGS --check-config`)
with exactly those arguments and env var names:
  - literal values are used as given (Kubernetes $(VAR) references and compose ${VAR:-default}
    interpolation expanded);
  - values from Secrets, ConfigMaps or the pod (valueFrom), and unset compose variables, become
    valid dummies chosen by name (a real base64 64-byte master key, tokens, postgres://u:p@db/x,
    rediss://r:6380);
  - TLS and master-key file paths (env or flag) become real files made here with openssl (a CA,
    a server certificate for localhost, a client certificate). In the chart, each such path must
    also lie on a volume mount of the container that provides that file.
It fails when a binary exits non-zero or reports an unknown flag, and when a container sets an
LLM_PROXY_* / DATABASE_URL / REDIS_URL variable that its binary does not read (clap ignores unknown
env vars, so a misspelt one would otherwise pass silently). `migrate` and `rotate-master-key`
containers run for real against a throwaway SQLite file.

A self-test then injects an unknown flag, a misspelt env var and an invalid master key into checked
containers and requires each to be caught.

Usage: scripts/check-deploy-flags.py BIN_DIR [--chart DIR] [--compose FILE] [--helm PATH]
                                     [--no-self-test]
  BIN_DIR: where the built binaries are, e.g. target/debug
"""

import argparse
import base64
import copy
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CP = "llm-proxy-control-plane"
DP = "llm-proxy-data-plane"
BINARIES = (CP, DP)
# Env vars the binaries read outside clap (not in --help).
EXTRA_ENV = {"LLM_PROXY_LOG_FORMAT"}
# Env names the "unknown variable" check applies to (others, e.g. RUST_LOG or OTEL_*, pass).
OURS = re.compile(r"^(LLM_PROXY_[A-Z0-9_]+|DATABASE_URL|REDIS_URL)$")
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def fail(msg):
    print(f"check-deploy-flags: {msg}", file=sys.stderr)
    sys.exit(1)


class Material:
    """Files and dummy values that make the binaries' validation pass."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.master_key = base64.b64encode(os.urandom(64)).decode()
        self.master_key_file = self.write("master.key", self.master_key + "\n")
        self.sqlite = f"sqlite://{tmp}/throwaway.db"
        self.make_tls()

    def write(self, name, text):
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def openssl(self, *args):
        subprocess.run(["openssl", *args], cwd=self.tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def make_tls(self):
        self.openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                     "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
                     "-subj", "/CN=check-deploy-flags CA",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        for name, usage, san in (("server", "serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                                 ("client", "clientAuth", None)):
            self.openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                         "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
            ext = self.write(f"{name}.ext", "\n".join(filter(None, [
                "basicConstraints=CA:FALSE", "keyUsage=digitalSignature,keyEncipherment",
                f"extendedKeyUsage={usage}", san])) + "\n")
            self.openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                         "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext)
        self.files = {k: os.path.join(self.tmp, v) for k, v in {
            "ca": "ca.crt", "server.crt": "server.crt", "server.key": "server.key",
            "client.crt": "client.crt", "client.key": "client.key"}.items()}

    # Which generated file stands for a file-valued env var or flag of each binary.
    def file_for_env(self, name):
        return {
            "LLM_PROXY_MASTER_KEY_FILE": self.master_key_file,
            "LLM_PROXY_CP_TLS_CERT": self.files["server.crt"],
            "LLM_PROXY_CP_TLS_KEY": self.files["server.key"],
            "LLM_PROXY_CP_TLS_CLIENT_CA": self.files["ca"],
            "LLM_PROXY_DP_TLS_CA": self.files["ca"],
            "LLM_PROXY_DP_TLS_CERT": self.files["client.crt"],
            "LLM_PROXY_DP_TLS_KEY": self.files["client.key"],
            "LLM_PROXY_REDIS_CA_FILE": self.files["ca"],
        }.get(name)

    def file_for_flag(self, binary, flag):
        if binary == CP:
            table = {"--master-key-file": self.master_key_file,
                     "--tls-cert": self.files["server.crt"], "--tls-key": self.files["server.key"],
                     "--tls-client-ca": self.files["ca"]}
        else:
            table = {"--tls-ca": self.files["ca"], "--tls-cert": self.files["client.crt"],
                     "--tls-key": self.files["client.key"], "--redis-ca-file": self.files["ca"]}
        return table.get(flag)

    def dummy(self, name):
        if name == "LLM_PROXY_MASTER_KEY":
            return self.master_key
        if name.endswith("_TOKEN"):
            return "dummy-token-0123456789abcdef"
        if name == "DATABASE_URL":
            return "postgres://u:p@db/x"
        if name == "REDIS_URL":
            # rediss: valid with or without LLM_PROXY_REDIS_CA_FILE (plain redis:// is not).
            return "rediss://r:6380"
        if name.endswith("_NODE_ID"):
            return "dummy-node"
        return "dummy"


class Container:
    """One container that runs one of the binaries, as the deployment file describes it."""

    def __init__(self, source, binary, args, env, files=None):
        self.source = source      # e.g. "chart[default] Deployment/x container y"
        self.binary = binary
        self.args = list(args)    # arguments after the program
        self.env = env            # list of (name, value or None = from a secret/the pod/unset)
        self.files = files        # chart only: function(path) -> error or None (mount check)


# ---------------------------------------------------------------------------------------------
# Sources

def k8s_expand(value, env_so_far):
    """Kubernetes $(VAR) expansion with the variables defined before; $$ escapes."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        return env_so_far.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def mount_checker(pod_spec, container, secrets):
    """A function telling whether a file path is provided by the container's volume mounts."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}

    def provided_names(volume):
        """File names a volume provides, or None when it cannot be known (no items)."""
        names = set()
        sources = []
        if "secret" in volume:
            sources.append(("secret", volume["secret"].get("secretName"), volume["secret"]))
        if "configMap" in volume:
            sources.append(("configMap", volume["configMap"].get("name"), volume["configMap"]))
        for s in (volume.get("projected") or {}).get("sources", []):
            for kind in ("secret", "configMap"):
                if kind in s:
                    sources.append((kind, s[kind].get("name"), s[kind]))
        if not sources:
            return None
        for kind, name, spec in sources:
            if spec.get("items"):
                names |= {i["path"] for i in spec["items"]}
            elif kind == "secret" and name in secrets:
                names |= secrets[name]
            else:
                return None
        return names

    def check(path):
        for m in container.get("volumeMounts") or []:
            mount = m["mountPath"].rstrip("/")
            if not path.startswith(mount + "/"):
                continue
            if m["name"] not in volumes:
                return None  # a volumeClaimTemplate: any file may be there
            rel = path[len(mount) + 1:]
            if m.get("subPath"):
                return None
            names = provided_names(volumes[m["name"]])
            if names is not None and rel not in names:
                return (f"{path}: volume {m['name']} mounted at {m['mountPath']} provides "
                        f"{sorted(names)}, not {rel}")
            return None
        return f"{path} is on no volume mount of the container"
    return check


def chart_containers(chart, helm):
    sets = [("default", None)] + [
        (os.path.basename(f)[:-len("-values.yaml")], f)
        for f in sorted(glob.glob(os.path.join(chart, "ci", "*-values.yaml")))]
    found = []
    for name, values in sets:
        cmd = [helm, "template", "llm-proxy", chart, "--namespace", "llm-proxy"]
        if values:
            cmd += ["-f", values]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"helm template ({name}) failed:\n{r.stderr}")
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        secrets = {d["metadata"]["name"]: set(d.get("data") or {}) | set(d.get("stringData") or {})
                   for d in docs if d["kind"] == "Secret"}
        for doc in docs:
            if doc["kind"] not in WORKLOAD_KINDS:
                continue
            spec = doc["spec"]
            if doc["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            pod = spec if doc["kind"] == "Pod" else spec["template"]["spec"]
            for c in pod.get("initContainers", []) + pod["containers"]:
                command, args = c.get("command") or [], c.get("args") or []
                argv = command + args
                if not argv or os.path.basename(argv[0]) not in BINARIES:
                    continue  # another program, or the image's entrypoint
                env, known = [], {}
                for e in c.get("env") or []:
                    if "value" in e:
                        value = k8s_expand(str(e["value"]), known)
                        known[e["name"]] = value
                        env.append((e["name"], value))
                    else:
                        env.append((e["name"], None))
                for ef in c.get("envFrom") or []:
                    env.append((f"<envFrom {ef}>", None))
                found.append(Container(
                    f"chart[{name}] {doc['kind']}/{doc['metadata']['name']} container {c['name']}",
                    os.path.basename(argv[0]), argv[1:], env, mount_checker(pod, c, secrets)))
    return found


def compose_interpolate(value, dotenv):
    """Compose ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, $VAR and $$. None when a variable is
    neither in .env nor defaulted (its real value is the deployer's)."""
    unresolved = False

    def sub(m):
        nonlocal unresolved
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if name in dotenv and (dotenv[name] or op not in (":-", ":?")):
            return dotenv[name]
        if op in (":-", "-") and default:
            return interpolate_nested(default)
        unresolved = True
        return ""

    def interpolate_nested(text):
        return re.sub(pattern, sub, text)

    pattern = r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)"
    out = re.sub(pattern, sub, value)
    return None if unresolved else out


def read_dotenv(path):
    env = {}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip().strip("'\"")
    return env


def dockerfile_entrypoint(root):
    """ENTRYPOINT and CMD of the last stage of the Dockerfile beside the compose file."""
    path = os.path.join(root, "Dockerfile")
    entry, cmd = [], []
    if not os.path.exists(path):
        return entry, cmd
    text = re.sub(r"\\\n", " ", open(path).read())
    for line in text.splitlines():
        m = re.match(r"^\s*(FROM|ENTRYPOINT|CMD)\s+(.*)$", line, re.I)
        if not m:
            continue
        word, rest = m.group(1).upper(), m.group(2).strip()
        if word == "FROM":
            entry, cmd = [], []
            continue
        try:
            parsed = yaml.safe_load(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
        except yaml.YAMLError:
            parsed = shlex.split(rest)
        if word == "ENTRYPOINT":
            entry, cmd = parsed, []
        else:
            cmd = parsed
    return entry, cmd


def compose_containers(path):
    doc = yaml.safe_load(open(path)) or {}
    base = os.path.dirname(os.path.abspath(path))
    dotenv = read_dotenv(os.path.join(base, ".env"))
    image_entry, image_cmd = dockerfile_entrypoint(base)
    found, others = [], []

    def as_list(v):
        if v is None:
            return None
        return shlex.split(v) if isinstance(v, str) else [str(x) for x in v]

    for name, svc in (doc.get("services") or {}).items():
        entry, command = as_list(svc.get("entrypoint")), as_list(svc.get("command"))
        if entry is None:
            uses_our_image = "build" in svc or "llm-proxy" in str(svc.get("image", ""))
            entry = image_entry if uses_our_image else []
            if command is None and uses_our_image:
                command = image_cmd
        argv = [compose_interpolate(a, dotenv) or "" for a in (entry or []) + (command or [])]
        idx = next((i for i, a in enumerate(argv) if os.path.basename(a) in BINARIES), None)
        if idx is None:
            others.append(name)
            continue
        env = []
        for env_file in as_list(svc.get("env_file")) or []:
            for k, v in read_dotenv(os.path.join(base, env_file)).items():
                env.append((k, v))
        raw = svc.get("environment") or {}
        items = raw.items() if isinstance(raw, dict) else (
            (e.split("=", 1) + [None])[:2] for e in raw)
        for k, v in items:
            if v is None:  # "NAME" alone: taken from the deployer's shell
                env.append((k, compose_interpolate(f"${{{k}}}", dotenv)))
            else:
                env.append((k, compose_interpolate(str(v), dotenv)))
        found.append(Container(f"compose service {name}", os.path.basename(argv[idx]),
                               argv[idx + 1:], env))
    return found, others


# ---------------------------------------------------------------------------------------------
# Running the binaries

def accepted_env(bin_dir):
    names = {}
    for binary, help_args in ((CP, ["check-config", "--help"]), (DP, ["--help"])):
        out = subprocess.run([os.path.join(bin_dir, binary), *help_args], capture_output=True,
                             text=True, timeout=30).stdout
        names[binary] = set(re.findall(r"\[env: ([A-Z0-9_]+)", out)) | EXTRA_ENV
        if len(names[binary]) < 5:
            fail(f"could not read the env vars of {binary} from its --help")
    return names


FILE_FLAGS = {"--master-key-file", "--tls-cert", "--tls-key", "--tls-client-ca", "--tls-ca"}


def check(container, bin_dir, mat, env_names):
    """Returns (ok, message)."""
    problems = []
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for name, value in container.env:
        if name.startswith("<envFrom"):
            problems.append(f"{name}: the variables it brings cannot be checked; use env entries")
            continue
        if OURS.match(name) and name not in env_names[container.binary]:
            problems.append(f"env {name} is not read by {container.binary} (misspelt, or for the "
                            f"other binary?)")
        target = mat.file_for_env(name)
        if target:
            if value and container.files:
                err = container.files(value)
                if err:
                    problems.append(f"env {name}: {err}")
            env[name] = target
        elif value is None:
            env[name] = mat.dummy(name)
        else:
            env[name] = value
    args, i = [], 0
    while i < len(container.args):
        a = container.args[i]
        flag, eq, val = a.partition("=")
        target = mat.file_for_flag(container.binary, flag) if flag in FILE_FLAGS else None
        if target and eq:
            if container.files and (err := container.files(val)):
                problems.append(f"flag {flag}: {err}")
            args.append(f"{flag}={target}")
        elif target and i + 1 < len(container.args):
            if container.files and (err := container.files(container.args[i + 1])):
                problems.append(f"flag {flag}: {err}")
            args += [flag, target]
            i += 1
        else:
            args.append(a)
        i += 1
    if container.binary == CP:
        if args and args[0] in ("migrate", "rotate-master-key"):
            # No check-config for these: run them for real on a throwaway SQLite database.
            env["DATABASE_URL"] = mat.sqlite
            args = [a if not a.startswith("--database-url") else f"--database-url={mat.sqlite}"
                    for a in args]
            argv = [args[0], *args[1:]]
        elif args and args[0] in ("serve", "check-config"):
            argv = ["check-config", *args[1:]]
        else:
            argv = ["check-config", *args]
    else:
        argv = [*args, "--check-config"]
    cmd = [os.path.join(bin_dir, container.binary), *argv]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, problems + [f"`{shlex.join([container.binary, *argv])}` timed out"]
    output = (r.stdout + r.stderr).strip()
    if r.returncode != 0 or re.search(r"unexpected argument|unrecognized|unknown (flag|option)", output):
        problems.append(f"`{shlex.join([container.binary, *argv])}` exited {r.returncode}: {output}")
    if problems:
        return False, "; ".join(problems)
    return True, output.splitlines()[-1] if output else "exit 0"


def self_test(containers, bin_dir, mat, env_names):
    """Each injected mistake must be caught, or the check proves nothing."""
    ok = True
    for binary in BINARIES:
        base = next((c for c in containers if c.binary == binary), None)
        if base is None:
            continue
        cases = []
        c = copy.deepcopy(base)
        c.files = base.files
        c.args.append("--definitely-not-a-flag")
        cases.append(("an unknown flag", c, "unexpected argument"))
        c = copy.deepcopy(base)
        c.files = base.files
        c.env.append(("LLM_PROXY_TLS_CERTIFICATE", "/x"))
        cases.append(("a misspelt env var", c, "LLM_PROXY_TLS_CERTIFICATE is not read"))
        if binary == CP:
            c = copy.deepcopy(base)
            c.files = base.files
            c.env = [(n, v) for n, v in c.env if n != "LLM_PROXY_MASTER_KEY"]
            c.env.append(("LLM_PROXY_MASTER_KEY", "bm90LWEta2V5"))
            cases.append(("an invalid master key", c, "exited 1"))
        else:
            c = copy.deepcopy(base)
            c.files = base.files
            c.env = [(n, v) for n, v in c.env if n != "REDIS_URL"] + [("REDIS_URL", "http://x")]
            cases.append(("an invalid Redis URL", c, "exited 1"))
        # A container that talks plaintext gRPC off loopback must say so: without the opt-in the
        # binary refuses to start.
        plain = next((c for c in containers if c.binary == binary
                      and any(n == "LLM_PROXY_ALLOW_PLAINTEXT" for n, _ in c.env)), None)
        if plain is not None:
            c = copy.deepcopy(plain)
            c.files = plain.files
            c.env = [(n, v) for n, v in c.env if n != "LLM_PROXY_ALLOW_PLAINTEXT"]
            cases.append(("plaintext gRPC off loopback without LLM_PROXY_ALLOW_PLAINTEXT", c,
                          "refusing plaintext"))
        file_env = next(((n, v) for n, v in base.env if v and mat.file_for_env(n)), None)
        if base.files and file_env:
            c = copy.deepcopy(base)
            c.files = base.files
            c.env = [(n, os.path.join(os.path.dirname(v), "not-mounted.pem") if n == file_env[0] else v)
                     for n, v in c.env]
            cases.append((f"{file_env[0]} naming a file no volume provides", c, "not not-mounted.pem"))
        for what, case, expect in cases:
            passed, msg = check(case, bin_dir, mat, env_names)
            if passed or expect not in msg:
                print(f"SELF-TEST FAIL {binary} with {what} was not caught ({msg})")
                ok = False
            else:
                print(f"self-test ok   {binary} with {what}: caught ({msg[:110]}...)")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bin_dir", help="directory of the built binaries, e.g. target/debug")
    p.add_argument("--chart", default=os.path.join(ROOT, "charts", "llm-proxy"))
    p.add_argument("--compose", default=os.path.join(ROOT, "docker-compose.yml"))
    p.add_argument("--helm", default=os.environ.get("HELM"))
    p.add_argument("--no-self-test", action="store_true")
    opts = p.parse_args()

    bin_dir = os.path.abspath(opts.bin_dir)
    for b in BINARIES:
        if not os.access(os.path.join(bin_dir, b), os.X_OK):
            fail(f"{os.path.join(bin_dir, b)} not found: build it first (cargo build --bins)")
    if not shutil.which("openssl"):
        fail("openssl is needed to make the TLS test files")
    helm = opts.helm or subprocess.run(
        [os.path.join(ROOT, "..", "shared", "tools", "get-helm.sh")],
        capture_output=True, text=True, check=True).stdout.strip()

    containers = chart_containers(opts.chart, helm)
    if os.path.exists(opts.compose):
        from_compose, others = compose_containers(opts.compose)
        print(f"{opts.compose}: {len(from_compose)} llm-proxy service(s); "
              f"not running an llm-proxy binary: {', '.join(others) or 'none'}")
        if not from_compose:
            print(f"check-deploy-flags: FAIL: {opts.compose} starts no {CP} or {DP}")
            return 1
        containers += from_compose
    else:
        print(f"{opts.compose} does not exist: skipped (chart only)")
    for b in BINARIES:
        if not any(c.binary == b for c in containers):
            print(f"check-deploy-flags: FAIL: no container runs {b}")
            return 1

    env_names = accepted_env(bin_dir)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="llm-proxy-flags.") as tmp:
        mat = Material(tmp)
        for c in containers:
            ok, msg = check(c, bin_dir, mat, env_names)
            print(f"{'ok  ' if ok else 'FAIL'} {c.source} ({c.binary} {shlex.join(c.args)}): {msg}")
            failed += not ok
        if not opts.no_self_test and not self_test(containers, bin_dir, mat, env_names):
            failed += 1
    print(f"check-deploy-flags: {len(containers)} container(s) checked, "
          f"{'all passed' if not failed else f'{failed} FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
