#!/usr/bin/env bash
# Chart checks (DESIGN §14, layer 5) for charts/llm-proxy:
#   1. helm lint --strict with the default values and with each charts/llm-proxy/ci/*-values.yaml;
#   2. helm template with the same values sets;
#   3. every rendered object validated against the Kubernetes $KUBE_VERSION JSON schemas with
#      kubernetes-validate in strict mode (unknown fields are errors; through its Python API, the
#      check `kubernetes-validate --strict` runs, because the CLI only warns about a kind it has no
#      schema for), plus the chart's own rules (security contexts, probes, resources, references
#      between objects);
#   4. an upgrade simulation: generated secrets and certificates are kept across upgrades;
#   5. negative checks: a wrong type and a typo in values must fail lint, an impossible value
#      combination must fail template, a broken manifest must fail validation and a weakened
#      security context the chart rules, so this script is proven able to fail.
# Kinds from CRDs have no schema in kubernetes-validate; only these are skipped, by kind:
# ServiceMonitor (monitoring.coreos.com), Certificate, Issuer, ClusterIssuer (cert-manager.io).
# They get a structural check of their own instead. Any other kind without a schema is an error.
# Usage: scripts/check-chart.sh   (env: KUBE_VERSION=1.30.0, HELM=/path/to/helm)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
chart=$root/charts/llm-proxy
KUBE_VERSION=${KUBE_VERSION:-1.30.0}
HELM=${HELM:-$("$here/../../shared/tools/get-helm.sh")}
echo "check-chart: $("$HELM" version --short), Kubernetes schemas $KUBE_VERSION"

if ! python3 -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  echo "check-chart: installing kubernetes-validate" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore kubernetes-validate >&2
fi

out=$(mktemp -d /tmp/llm-proxy-chart.XXXXXX)
trap 'rm -rf "$out"' EXIT

# name|values file ("" = chart defaults)
sets=("default|")
for f in "$chart"/ci/*-values.yaml; do
  sets+=("$(basename "$f" -values.yaml)|$f")
done

failed=0
for s in "${sets[@]}"; do
  name=${s%%|*}
  file=${s#*|}
  args=()
  [[ -n $file ]] && args=(-f "$file")
  if ! "$HELM" lint --strict --kube-version "$KUBE_VERSION" "$chart" "${args[@]}" >"$out/$name.lint" 2>&1; then
    echo "FAIL helm lint --strict ($name):" >&2
    cat "$out/$name.lint" >&2
    failed=1
    continue
  fi
  if ! "$HELM" template llm-proxy "$chart" --namespace llm-proxy --kube-version "$KUBE_VERSION" \
      "${args[@]}" >"$out/$name.yaml" 2>"$out/$name.err"; then
    echo "FAIL helm template ($name):" >&2
    cat "$out/$name.err" >&2
    failed=1
    continue
  fi
  echo "ok   lint + template: $name"
done

validate() {
  python3 - "$KUBE_VERSION" "$@" <<'PY'
import sys, yaml
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

version, mode, files = sys.argv[1], sys.argv[2], sys.argv[3:]
# CRD kinds kubernetes-validate has no schema for: skipped explicitly, by API group and kind.
CRD_KINDS = {
    ("monitoring.coreos.com", "ServiceMonitor"),
    ("cert-manager.io", "Certificate"),
    ("cert-manager.io", "Issuer"),
    ("cert-manager.io", "ClusterIssuer"),
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
errors = []


def err(where, msg):
    errors.append(f"{where}: {msg}")


def crd_check(where, doc):
    """Structure of the CRD objects the chart renders (they have no schema here)."""
    spec = doc.get("spec") or {}
    kind = doc["kind"]
    if kind == "Certificate":
        for key in ("secretName", "issuerRef"):
            if key not in spec:
                err(where, f"spec.{key} missing")
        if not (spec.get("issuerRef") or {}).get("name"):
            err(where, "spec.issuerRef.name missing")
        if not spec.get("isCA") and not (spec.get("dnsNames") or spec.get("commonName")):
            err(where, "a leaf certificate needs dnsNames or commonName")
    elif kind in ("Issuer", "ClusterIssuer"):
        types = [k for k in ("selfSigned", "ca", "acme", "vault", "venafi") if k in spec]
        if len(types) != 1:
            err(where, f"an issuer needs exactly one type, got {types}")
    elif kind == "ServiceMonitor":
        if not (spec.get("selector") or {}).get("matchLabels"):
            err(where, "spec.selector.matchLabels missing")
        if not spec.get("endpoints") or not all("port" in e for e in spec["endpoints"]):
            err(where, "spec.endpoints[].port missing")


def rules(name, docs):
    """The chart's own rules: hardening, probes, resources, and references that must resolve."""
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    secrets = {d["metadata"]["name"]: set((d.get("data") or {}) | (d.get("stringData") or {}))
               for d in by_kind.get("Secret", [])}
    pods = []  # (workload name, pod labels, container ports by name)
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        where = f"{name}: {w['kind']}/{w['metadata']['name']}"
        pod = w["spec"]["template"]
        spec = pod["spec"]
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            err(where, "pod securityContext.runAsNonRoot must be true")
        if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            err(where, "pod securityContext.seccompProfile.type must be RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            err(where, "automountServiceAccountToken must be false")
        sel = w["spec"]["selector"]["matchLabels"]
        labels = pod["metadata"].get("labels") or {}
        if any(labels.get(k) != v for k, v in sel.items()):
            err(where, "selector does not match the pod template labels")
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        ports = {}
        for c in spec.get("initContainers", []) + spec["containers"]:
            cw = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                err(cw, "allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                err(cw, "readOnlyRootFilesystem must be true")
            if sc.get("runAsNonRoot") is not True:
                err(cw, "runAsNonRoot must be true")
            if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
                err(cw, "capabilities.drop must be [ALL]")
            res = c.get("resources") or {}
            if not res.get("requests") or not res.get("limits"):
                err(cw, "resources.requests and resources.limits must be set")
            if c in spec["containers"]:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        err(cw, f"{probe} missing")
            for p in c.get("ports", []):
                ports[p.get("name")] = p["containerPort"]
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and not any(
                        t["metadata"]["name"] == m["name"] for t in w["spec"].get("volumeClaimTemplates", [])):
                    err(cw, f"volumeMount {m['name']} has no volume")
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] in secrets and ref["key"] not in secrets[ref["name"]]:
                    err(cw, f"env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
        for v in volumes.values():
            sources = [s.get("secret") for s in (v.get("projected") or {}).get("sources", [])]
            sources += [v.get("secret")] if v.get("secret") else []
            for s in filter(None, sources):
                sname = s.get("name") or s.get("secretName")
                for item in s.get("items", []):
                    if sname in secrets and item["key"] not in secrets[sname]:
                        err(where, f"volume {v['name']}: Secret {sname} has no key {item['key']}")
        pods.append((w["metadata"]["name"], labels, ports))
    for svc in by_kind.get("Service", []):
        where = f"{name}: Service/{svc['metadata']['name']}"
        sel = svc["spec"].get("selector") or {}
        match = [p for p in pods if all(p[1].get(k) == v for k, v in sel.items())]
        if not match:
            err(where, "selector matches no workload")
        for port in svc["spec"]["ports"]:
            tp = port.get("targetPort")
            if isinstance(tp, str) and not any(tp in p[2] for p in match):
                err(where, f"targetPort {tp} is not a port of the selected pods")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) not in names:
            err(f"{name}: HPA/{hpa['metadata']['name']}", f"scale target {ref['kind']}/{ref['name']} not rendered")
        if any(d["kind"] == ref["kind"] and d["metadata"]["name"] == ref["name"] and "replicas" in d["spec"]
               for d in docs):
            err(f"{name}: HPA/{hpa['metadata']['name']}", "the scaled Deployment must not set spec.replicas")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        sel = pdb["spec"]["selector"]["matchLabels"]
        if not any(all(p[1].get(k) == v for k, v in sel.items()) for p in pods):
            err(f"{name}: PodDisruptionBudget/{pdb['metadata']['name']}", "selector matches no workload")


total = skipped = 0
for path in files:
    name = path.rsplit("/", 1)[-1].removesuffix(".yaml")
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    if mode == "self-test":
        # Break two Deployments: an unknown field in one, a wrong type in the other.
        first, second = [d for d in docs if d["kind"] == "Deployment"][:2]
        first["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
        second["spec"]["replicas"] = "two"
    if not docs:
        err(name, "rendered no objects")
    for doc in docs:
        total += 1
        group = doc.get("apiVersion", "").rpartition("/")[0]
        where = f"{name}: {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        if (group, doc.get("kind")) in CRD_KINDS:
            skipped += 1
            crd_check(where, doc)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as e:
            path_ = ".".join(str(p) for p in e.path)
            err(where, f"{path_}: {e.message}")
        except SchemaNotFoundError as e:
            err(where, e.message)
    if mode == "check":
        rules(name, docs)
for e in errors:
    print(f"  {e}")
print(f"{total} objects, {total - skipped} validated against Kubernetes {version} (strict), "
      f"{skipped} CRD objects (ServiceMonitor, cert-manager) checked structurally, {len(errors)} errors")
sys.exit(1 if errors else 0)
PY
}

rendered=("$out"/*.yaml)
echo "check-chart: validating ${#rendered[@]} rendered values sets"
if ! validate check "${rendered[@]}"; then
  echo "FAIL kubernetes-validate / chart rules" >&2
  failed=1
fi

# Upgrades: `lookup` returns nothing under `helm template`, so a copy of the chart answers it from
# the Secrets of the previous render instead. Generated values must survive an upgrade, and turning
# mTLS on later must issue the client certificate from the same CA.
echo "check-chart: upgrade simulation (generated secrets and certificates kept)"
if ! python3 - "$HELM" "$chart" "$out" "$KUBE_VERSION" <<'PY'
import base64, json, os, re, shutil, subprocess, sys, yaml
helm, chart, out, kube = sys.argv[1:]
copy = os.path.join(out, "upgrade-chart")
shutil.copytree(chart, copy)
os.remove(os.path.join(copy, "values.schema.json"))  # it rejects the _fakeLookup value
replaced = 0
for name in os.listdir(os.path.join(copy, "templates")):
    path = os.path.join(copy, "templates", name)
    text, n = re.subn(r'lookup "v1" "Secret" \S+ (\$\w+)',
                      r'(get ($.Values._fakeLookup | default dict) \1 | default dict)', open(path).read())
    replaced += n
    open(path, "w").write(text)
if replaced != 4 or "lookup " in "".join(open(os.path.join(copy, "templates", n)).read()
                                         for n in os.listdir(os.path.join(copy, "templates"))
                                         if n.endswith(".yaml")):
    sys.exit(f"upgrade simulation: expected to replace the chart's 4 Secret lookups, replaced {replaced}")

def render(previous, *args):
    fake = os.path.join(out, "fake-lookup.yaml")
    with open(fake, "w") as f:
        yaml.safe_dump({"_fakeLookup": previous}, f)
    r = subprocess.run([helm, "template", "llm-proxy", copy, "--namespace", "llm-proxy",
                        "--kube-version", kube, "-f", fake, *args],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"helm template failed: {r.stderr}")
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(r.stdout)
            if d and d["kind"] == "Secret"}

errors = []
def expect(cond, msg):
    if not cond:
        errors.append(msg)

def pem(secret, key):
    path = os.path.join(out, f"{secret['metadata']['name']}.{key}")
    open(path, "wb").write(base64.b64decode(secret["data"][key]))
    return path

first = render({})
main, ca, server = first["llm-proxy"], first["llm-proxy-ca"], first["llm-proxy-control-plane-tls"]
expect("llm-proxy-data-plane-tls" not in first, "client certificate rendered without mtls")
key = base64.b64decode(main["data"]["master-key"])
expect(len(base64.b64decode(key)) == 64, "generated master key is not base64 of 64 bytes")

second = render(first)
for name, secret in first.items():
    expect(second.get(name, {}).get("data") == secret["data"], f"upgrade changed Secret {name}")

third = render(second, "--set", "tls.mtls=true", "--set", "tls.extraDnsNames[0]=cp.example.com",
               "--set", "secrets.adminToken=chosen-admin-token")
expect(third["llm-proxy-ca"]["data"] == ca["data"], "upgrade replaced the CA")
expect(third["llm-proxy"]["data"]["master-key"] == main["data"]["master-key"], "master key changed")
expect(third["llm-proxy"]["data"]["dataplane-token"] == main["data"]["dataplane-token"],
       "data plane token changed")
expect(base64.b64decode(third["llm-proxy"]["data"]["admin-token"]) == b"chosen-admin-token",
       "secrets.adminToken given in values was not used")
new_server = third["llm-proxy-control-plane-tls"]
expect(new_server["data"]["tls.crt"] != server["data"]["tls.crt"],
       "server certificate not reissued after its names changed")
client = third.get("llm-proxy-data-plane-tls")
expect(client is not None, "mtls turned on but no client certificate")
if client:
    cafile = pem(ca, "tls.crt")
    for secret in (new_server, client):
        r = subprocess.run(["openssl", "verify", "-CAfile", cafile, pem(secret, "tls.crt")],
                           capture_output=True, text=True)
        expect(r.returncode == 0, f"{secret['metadata']['name']} not signed by the kept CA: {r.stdout}{r.stderr}")
    r = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in",
                        pem(new_server, "tls.crt")], capture_output=True, text=True)
    expect("cp.example.com" in r.stdout, "new server certificate lacks the added DNS name")
fourth = render(third, "--set", "tls.mtls=true", "--set", "tls.extraDnsNames[0]=cp.example.com",
                "--set", "secrets.adminToken=chosen-admin-token")
for name, secret in third.items():
    expect(fourth.get(name, {}).get("data") == secret["data"], f"second upgrade changed Secret {name}")
for e in errors:
    print(f"  {e}")
print(f"upgrade simulation: {len(errors)} errors")
sys.exit(1 if errors else 0)
PY
then
  echo "FAIL upgrade simulation" >&2
  failed=1
fi

# Negative checks: each of these must fail, or the checks above prove nothing.
echo "check-chart: negative checks (each must fail)"
cat >"$out/bad-type.values" <<'EOF'
dataPlane:
  replicaCount: "three"
EOF
cat >"$out/bad-typo.values" <<'EOF'
dataPlane:
  replicas: 3
EOF
cat >"$out/bad-enum.values" <<'EOF'
dataPlane:
  ratelimitFailMode: sometimes
EOF
cat >"$out/bad-combination.values" <<'EOF'
postgresql:
  enabled: false
EOF
# expect_fail WHAT PATTERN CMD...: CMD must fail, and its output must match PATTERN (the reason).
expect_fail() {
  local what=$1 pattern=$2
  shift 2
  if "$@" >"$out/neg.log" 2>&1; then
    echo "FAIL negative check passed but must fail: $what" >&2
    failed=1
  elif ! grep -q -E "$pattern" "$out/neg.log"; then
    echo "FAIL negative check failed for another reason than expected ($pattern): $what" >&2
    cat "$out/neg.log" >&2
    failed=1
  else
    echo "ok   fails as it must: $what: $(grep -m1 -o -E "$pattern.{0,60}" "$out/neg.log")"
  fi
}
expect_fail "lint, wrong type" "at '/dataPlane/replicaCount': got string" \
  "$HELM" lint --strict "$chart" -f "$out/bad-type.values"
expect_fail "lint, unknown key" "additional properties 'replicas' not allowed" \
  "$HELM" lint --strict "$chart" -f "$out/bad-typo.values"
expect_fail "template, value outside the enum" "at '/dataPlane/ratelimitFailMode'" \
  "$HELM" template llm-proxy "$chart" -f "$out/bad-enum.values"
expect_fail "template, impossible combination" "no database" \
  "$HELM" template llm-proxy "$chart" -f "$out/bad-combination.values"
expect_fail "kubernetes-validate, Deployment with an unknown field" "'imagePullPolice' was unexpected" \
  validate self-test "$out/default.yaml"
grep -q "'two' is not of type 'integer'" "$out/neg.log" ||
  { echo "FAIL kubernetes-validate missed a wrong type (spec.replicas: two)" >&2; failed=1; }
"$HELM" template llm-proxy "$chart" --namespace llm-proxy --kube-version "$KUBE_VERSION" \
  --set securityContext.readOnlyRootFilesystem=false --set dataPlane.resources=null >"$out/weak.yaml"
expect_fail "chart rules, writable root filesystem" "readOnlyRootFilesystem must be true" \
  validate check "$out/weak.yaml"
grep -q "resources.requests and resources.limits must be set" "$out/neg.log" ||
  { echo "FAIL chart rules missed the data plane without resources" >&2; failed=1; }

if [[ $failed -ne 0 ]]; then
  echo "check-chart: FAILED" >&2
  exit 1
fi
echo "check-chart: all checks passed"
