#!/usr/bin/env python3
"""The Starling chart on a real cluster, checked with real clients.

Run through e2e/cluster/run.sh (it prints why it did not run without
KUBECONFIG). Steps, each reported as PASS/FAIL/SKIP:

 1. helm install charts/starling into a fresh namespace (--wait);
 2. kubectl apply a Broker, three Tokens and two ACLs; wait for Ready;
 3. port-forward the Broker's Service (8883 mqtts, 443 https);
 4. mosquitto_sub/mosquitto_pub over TLS on 8883 verified with the Token
    Secret's ca.crt; a wrong password and a wrong CA are refused;
 5. curl to /broker/ on 443 (publish, read back, 401 without credentials);
 6. MQTT over WSS (/mqtt) and a WebSocket topic stream (with paho-mqtt and
    websockets from e2e/.venv; skipped with the reason without them);
 7. an ACL change by kubectl apply applies live (403 -> 200);
 8. kubectl delete token disconnects that token's client within seconds;
 9. deleting the TLS Secret rotates the certificate without a pod restart;
10. helm upgrade with the same values changes nothing (no rollout);
11. the chart's example Broker comes up through helm upgrade, and helm
    uninstall leaves no orphans (namespace and cluster-scoped objects).

Environment:
  KUBECONFIG               required (run.sh refuses to guess)
  STARLING_OPERATOR_IMAGE  operator image (default: the chart's, i.e.
                           ghcr.io/starling-mqtt/starling-operator:<appVersion>)
  STARLING_BROKER_IMAGE    Broker spec.image (default: the operator's own
                           default, ghcr.io/starling-mqtt/starling-broker:<version>)
  E2E_SCOPE                cluster (default) or namespace (watch.scope=namespace)
  E2E_PSS                  Pod Security Standard the namespace enforces (default restricted)
  E2E_REVOKE_SECONDS       how fast a deleted Token must disconnect (default 15)
  E2E_KEEP=1               keep the namespace on failure, for a look
  KUBECTL, HELM            the binaries (default: PATH, then target/chart-check/bin)
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "starling"
SUFFIX = secrets.token_hex(3)
NS = f"starling-e2e-{SUFFIX}"
RELEASE = f"e2e-{SUFFIX}"
BROKER = "e2e"
SCOPE = os.environ.get("E2E_SCOPE", "cluster")
PSS = os.environ.get("E2E_PSS", "restricted")
REVOKE_SECONDS = float(os.environ.get("E2E_REVOKE_SECONDS", "15"))
WORK = Path(tempfile.mkdtemp(prefix="starling-cluster-e2e-"))

results = {"passed": 0, "failed": 0, "skipped": 0}


class Skip(Exception):
    pass


def say(msg):
    print(msg, flush=True)


def step(name, fn, required=False):
    """Runs one check; a required one that fails stops the suite."""
    t0 = time.monotonic()
    try:
        detail = fn() or ""
    except Skip as e:
        results["skipped"] += 1
        say(f"SKIP {name}: {e}")
        return False
    except Exception as e:  # noqa: BLE001 - every failure is reported
        results["failed"] += 1
        say(f"FAIL {name} ({time.monotonic() - t0:.1f} s): {e}")
        if not isinstance(e, AssertionError):
            traceback.print_exc()
        if required:
            raise Stop(name) from e
        return False
    results["passed"] += 1
    say(f"PASS {name} ({time.monotonic() - t0:.1f} s){': ' + detail if detail else ''}")
    return True


class Stop(Exception):
    pass


# ------------------------------------------------------------------ tools
def tool(env, name):
    if os.environ.get(env):
        return os.environ[env]
    found = shutil.which(name)
    if found:
        return found
    local = ROOT / "target" / "chart-check" / "bin" / name
    if local.exists():
        return str(local)
    raise SystemExit(f"e2e/cluster: {name} not found: put it on PATH, set {env}, or run scripts/chart-check.sh (it unpacks helm and kubectl into target/chart-check/bin)")


KUBECTL = tool("KUBECTL", "kubectl")
HELM = tool("HELM", "helm")
for t in ("mosquitto_pub", "mosquitto_sub", "curl"):
    if not shutil.which(t):
        raise SystemExit(f"e2e/cluster: {t} not found (apt-get install mosquitto-clients curl)")


def run(*args, check=True, timeout=600, input=None):
    p = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=timeout,
                       input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args[:6]))} … exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def kubectl(*args, **kw):
    return run(KUBECTL, *args, **kw)


def k(*args, **kw):
    return kubectl("-n", NS, *args, **kw)


def kjson(*args):
    return json.loads(k(*args, "-o", "json").stdout)


def apply(manifest: str):
    return k("apply", "-f", "-", input=manifest)


def until(what, fn, timeout=120, interval=1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Stop:
            raise
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else ""))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ state
state: dict = {}


def creds(token):
    data = kjson("get", "secret", f"{token}-credentials")["data"]
    out = {k2: base64.b64decode(v).decode() for k2, v in data.items()}
    ca = WORK / f"{token}-ca.crt"
    ca.write_text(out["ca.crt"])
    out["cafile"] = str(ca)
    return out


def mqtt_pub(token, password, topic, msg, cafile=None, extra=()):
    return run("mosquitto_pub", "-h", "localhost", "-p", state["mqtts"], "--cafile", cafile or state["ca"],
               "-u", token, "-P", password, "-t", topic, "-m", msg, "-q", "1", *extra, check=False, timeout=30)


def curl(*args, check=False):
    return run("curl", "-sS", "--max-time", "20", "--cacert", state["ca"], "-o", "-", "-w", "\n%{http_code}",
               *args, check=check, timeout=30)


def status_body(p):
    body, _, code = p.stdout.rpartition("\n")
    return int(code or 0), body


def https(path):
    return f"https://localhost:{state['https']}{path}"


# ------------------------------------------------------------------ steps
def preflight():
    ctx = kubectl("config", "current-context", check=False).stdout.strip() or "(none)"
    v = kubectl("version", "-o", "json", timeout=30)
    server = json.loads(v.stdout).get("serverVersion", {}).get("gitVersion", "?")
    hv = run(HELM, "version", "--short").stdout.strip()
    return f"context {ctx}, Kubernetes {server}, helm {hv}, namespace {NS}, release {RELEASE}, scope {SCOPE}"


def helm_args():
    args = ["--set", "image.pullPolicy=IfNotPresent"]
    img = os.environ.get("STARLING_OPERATOR_IMAGE")
    if img:
        if "@" in img:
            repo, digest = img.split("@", 1)
            args += ["--set", "image.registry=", "--set", f"image.repository={repo}", "--set", f"image.digest={digest}"]
        else:
            repo, _, tag = img.rpartition(":")
            if "/" in tag or not repo:
                repo, tag = img, ""
            args += ["--set", "image.registry=", "--set", f"image.repository={repo}"]
            if tag:
                args += ["--set", f"image.tag={tag}"]
    if SCOPE == "namespace":
        args += ["--set", "watch.scope=namespace"]
    return args


def install():
    crds = kubectl("get", "crd", "brokers.starling.dev", check=False)
    note = " (the CRDs were already there: helm does not update them; kubectl apply -f crds/ if they are older)" if crds.returncode == 0 else ""
    # A fresh namespace that enforces the "restricted" Pod Security Standard:
    # the operator's and the brokers' pods must pass it.
    kubectl("create", "namespace", NS)
    kubectl("label", "namespace", NS, f"pod-security.kubernetes.io/enforce={PSS}", "pod-security.kubernetes.io/enforce-version=latest")
    run(HELM, "install", RELEASE, CHART, "-n", NS, "--wait", "--timeout", "5m", *helm_args())
    dep = kjson("get", "deployment", f"{RELEASE}-starling-operator")
    assert dep["status"].get("readyReplicas") == 1, dep["status"]
    state["operator_generation"] = dep["metadata"]["generation"]
    return f"operator {dep['spec']['template']['spec']['containers'][0]['image']} ready in a namespace enforcing PSS {PSS}{note}"


def apply_resources():
    image = os.environ.get("STARLING_BROKER_IMAGE")
    image_line = f"\n  image: {image}\n  imagePullPolicy: IfNotPresent" if image else ""
    apply(f"""
apiVersion: starling.dev/v1alpha1
kind: Broker
metadata:
  name: {BROKER}
spec:
  replicas: 1{image_line}
  tls:
    dnsNames: [localhost]
---
apiVersion: starling.dev/v1alpha1
kind: Token
metadata: {{name: writer}}
spec: {{brokerRef: {{name: {BROKER}}}, description: e2e publisher}}
---
apiVersion: starling.dev/v1alpha1
kind: Token
metadata: {{name: reader}}
spec: {{brokerRef: {{name: {BROKER}}}, description: e2e subscriber}}
---
apiVersion: starling.dev/v1alpha1
kind: Token
metadata: {{name: outsider}}
spec: {{brokerRef: {{name: {BROKER}}}, description: no ACL}}
---
apiVersion: starling.dev/v1alpha1
kind: ACL
metadata: {{name: writers}}
spec:
  brokerRef: {{name: {BROKER}}}
  tokens: [writer]
  rules:
  - topics: ["e2e/#"]
    actions: [publish]
---
apiVersion: starling.dev/v1alpha1
kind: ACL
metadata: {{name: readers}}
spec:
  brokerRef: {{name: {BROKER}}}
  tokens: [reader]
  rules:
  - topics: ["e2e/#"]
    actions: [subscribe]
""")
    k("wait", f"broker/{BROKER}", "--for=condition=Ready", "--timeout=300s", timeout=330)
    k("wait", "token/writer", "token/reader", "token/outsider", "--for=condition=Ready", "--timeout=120s", timeout=150)
    k("wait", "acl/writers", "acl/readers", "--for=condition=Ready", "--timeout=120s", timeout=150)
    for t in ("writer", "reader", "outsider"):
        state[t] = creds(t)
    c = state["writer"]
    for key in ("username", "password", "ca.crt", "mqtts-url", "https-url", "host", "port"):
        assert c.get(key), f"writer-credentials has no {key}"
    assert c["username"] == "writer", c["username"]
    state["ca"] = c["cafile"]
    pod = kjson("get", "pod", f"{BROKER}-0")
    state["pod_uid"] = pod["metadata"]["uid"]
    state["restarts"] = sum(s.get("restartCount", 0) for s in pod["status"].get("containerStatuses", []))
    return f"Broker Ready, 3 Tokens, 2 ACLs; {c['mqtts-url']}, {c['https-url']}"


def port_forward():
    state["mqtts"], state["https"] = free_port(), free_port()
    p = subprocess.Popen([KUBECTL, "-n", NS, "port-forward", "--address", "127.0.0.1", f"service/{BROKER}",
                          f"{state['mqtts']}:8883", f"{state['https']}:443"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    state["pf"] = p
    seen = []

    def read():
        for line in p.stdout:
            seen.append(line.strip())

    threading.Thread(target=read, daemon=True).start()
    def forwarding():
        if p.poll() is not None:
            raise Stop("kubectl port-forward exited: " + " | ".join(seen))
        return sum("Forwarding from" in line for line in seen) >= 2

    until("kubectl port-forward", forwarding, timeout=30, interval=0.2)
    return f"127.0.0.1:{state['mqtts']} -> 8883, 127.0.0.1:{state['https']} -> 443"


class Sub:
    """A mosquitto_sub in the background, its output lines collected."""

    def __init__(self, token, topic, extra=()):
        c = state[token]
        self.p = subprocess.Popen(["mosquitto_sub", "-h", "localhost", "-p", str(state["mqtts"]), "--cafile", state["ca"],
                                   "-u", token, "-P", c["password"], "-t", topic, "-v", "-q", "1", *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def has(self, needle):
        return any(needle in l for _, l in self.lines)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()


def deliver(sub, topic, msg, timeout=30):
    """Publishes (as writer) until the subscriber has the message."""
    def got():
        if sub.has(f"{topic} {msg}"):
            return True
        assert sub.p.poll() is None, "mosquitto_sub exited: " + " | ".join(l for _, l in sub.lines)
        mqtt_pub("writer", state["writer"]["password"], topic, msg)
        return sub.has(f"{topic} {msg}")
    until(f"{msg!r} on {topic}", got, timeout=timeout, interval=0.5)


def mqtt_tls():
    sub = Sub("reader", "e2e/#")
    try:
        deliver(sub, "e2e/hello", "hi-over-mqtts")
    finally:
        sub.stop()
    bad = mqtt_pub("outsider", "not-the-password-0123456789", "e2e/x", "nope")
    assert bad.returncode != 0, "a wrong password was accepted"
    sysca = "/etc/ssl/certs/ca-certificates.crt"
    if os.path.exists(sysca):
        bad = mqtt_pub("writer", state["writer"]["password"], "e2e/x", "nope", cafile=sysca)
        assert bad.returncode != 0, "the server certificate verified against the system CAs"
    return "reader got the writer's message over TLS (ca.crt, hostname localhost); wrong password and wrong CA refused"


def http_broker():
    w, r = state["writer"]["password"], state["reader"]["password"]
    code, body = status_body(curl("-X", "POST", "-u", f"writer:{w}", "--data", "21.5", https("/broker/e2e/curl?retained=true")))
    assert code == 200 and "matched" in body, f"POST /broker/e2e/curl: {code} {body}"
    code, body = status_body(curl("-u", f"reader:{r}", https("/broker/e2e/curl?retained=true&wait=5")))
    assert code == 200 and body == "21.5", f"GET /broker/e2e/curl: {code} {body!r}"
    code, body = status_body(curl(https("/broker/e2e/curl?wait=0")))
    assert code == 401, f"anonymous GET: {code} {body}"
    return "POST as writer 200, GET as reader 21.5, anonymous 401 (HTTPS on 443, ca.crt)"


def websockets_wss():
    try:
        import websockets.sync.client as wsc  # type: ignore
    except ImportError:
        raise Skip("the websockets package is not importable (run e2e/run-python.sh once to make e2e/.venv)")
    ctx = ssl.create_default_context(cafile=state["ca"])
    r = state["reader"]["password"]
    url = f"wss://localhost:{state['https']}/e2e/@?access_token={r}"
    with wsc.connect(url, ssl=ctx, open_timeout=15) as ws:
        got = []

        def recv():
            try:
                got.append(ws.recv(timeout=30))
            except Exception as e:  # noqa: BLE001
                got.append(e)

        t = threading.Thread(target=recv, daemon=True)
        t.start()

        def delivered():
            if got:
                return True
            mqtt_pub("writer", state["writer"]["password"], "e2e/ws", "hi-over-wss")
            return bool(got)

        until("a topic-stream frame", delivered, timeout=30, interval=0.5)
    frame = got[0]
    assert frame in ("hi-over-wss", "21.5"), f"topic stream got {frame!r}"
    detail = "topic stream wss://…/e2e/@ got a frame"
    try:
        import paho.mqtt.client as mqtt  # type: ignore
    except ImportError:
        return detail + "; MQTT over WSS skipped: paho-mqtt not importable"
    box = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"e2e-wss-{SUFFIX}", transport="websockets")
    c.ws_set_options(path="/mqtt")
    c.tls_set(ca_certs=state["ca"])
    c.username_pw_set("reader", r)
    c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe("e2e/#", qos=1)
    c.on_message = lambda cl, u, m: box.append((m.topic, m.payload.decode(errors="replace")))
    c.connect("localhost", state["https"], keepalive=30)
    c.loop_start()
    try:
        def wss_got():
            if any(m == ("e2e/mqtt-ws", "hi-over-mqtt-wss") for m in box):
                return True
            mqtt_pub("writer", state["writer"]["password"], "e2e/mqtt-ws", "hi-over-mqtt-wss")
            return any(m == ("e2e/mqtt-ws", "hi-over-mqtt-wss") for m in box)
        until("MQTT over WSS delivery", wss_got, timeout=30, interval=0.5)
    finally:
        c.loop_stop()
        c.disconnect()
    return detail + "; paho over wss://…/mqtt subscribed and got the writer's message"


def acl_live():
    r = state["reader"]["password"]
    code, body = status_body(curl("-X", "POST", "-u", f"reader:{r}", "--data", "x", https("/broker/e2e/acl")))
    assert code == 403, f"reader may not publish yet, got {code} {body}"
    t0 = time.monotonic()
    apply(f"""
apiVersion: starling.dev/v1alpha1
kind: ACL
metadata: {{name: readers}}
spec:
  brokerRef: {{name: {BROKER}}}
  tokens: [reader]
  rules:
  - topics: ["e2e/#"]
    actions: [subscribe, publish]
""")

    def allowed():
        code, _ = status_body(curl("-X", "POST", "-u", f"reader:{r}", "--data", "x", https("/broker/e2e/acl")))
        return code == 200

    until("the ACL change to reach the broker", allowed, timeout=60, interval=0.5)
    return f"reader's POST went 403 -> 200 {time.monotonic() - t0:.1f} s after kubectl apply, no restart"


def revoke():
    sub = Sub("reader", "e2e/#", extra=("-d",))
    try:
        deliver(sub, "e2e/revoke", "before-revoke")
        n = len(sub.lines)
        t0 = time.monotonic()
        k("delete", "token", "reader", "--wait=false")

        def disconnected():
            if sub.p.poll() is not None:
                return True
            return any(re.search(r"refused|not authori|connection lost|disconnect|error", l, re.I)
                       for _, l in sub.lines[n:])

        until("the deleted Token's client to be disconnected", disconnected, timeout=REVOKE_SECONDS + 60, interval=0.2)
        took = time.monotonic() - t0
    finally:
        sub.stop()
    assert took <= REVOKE_SECONDS, f"disconnected {took:.1f} s after kubectl delete token (limit {REVOKE_SECONDS:.0f} s)"
    bad = run("mosquitto_sub", "-h", "localhost", "-p", state["mqtts"], "--cafile", state["ca"], "-u", "reader",
              "-P", state["reader"]["password"], "-t", "e2e/#", "-C", "1", "-W", "5", check=False, timeout=30)
    assert bad.returncode != 0, "the deleted Token's secret still connects"
    until("reader-credentials to be garbage-collected",
          lambda: k("get", "secret", "reader-credentials", check=False).returncode != 0, timeout=60)
    return f"disconnected {took:.1f} s after kubectl delete token; its secret no longer connects; its credentials Secret is gone"


def server_cert():
    """The PEM certificate served on 8883 (not verified: only compared)."""
    return ssl.get_server_certificate(("127.0.0.1", state["mqtts"]), timeout=10)


def tls_rotation():
    before = server_cert()
    k("delete", "secret", f"{BROKER}-tls")
    until("a new server certificate on 8883", lambda: server_cert() != before, timeout=180, interval=2)
    pod = kjson("get", "pod", f"{BROKER}-0")
    restarts = sum(s.get("restartCount", 0) for s in pod["status"].get("containerStatuses", []))
    assert pod["metadata"]["uid"] == state["pod_uid"], "the broker pod was replaced"
    assert restarts == state["restarts"], f"the broker container restarted ({restarts})"
    ok = mqtt_pub("writer", state["writer"]["password"], "e2e/rotated", "after-rotation")
    assert ok.returncode == 0, f"the new certificate does not verify with ca.crt: {ok.stderr}"
    return "new certificate served by the same pod, no restart, still verifies with ca.crt"


def snapshot():
    dep = kjson("get", "deployment", f"{RELEASE}-starling-operator")
    sts = kjson("get", "statefulset", BROKER)
    pods = sorted(p["metadata"]["uid"] for p in kjson("get", "pods")["items"])
    crb = kubectl("get", "clusterrole", f"{RELEASE}-starling-operator", "-o", "json", check=False)
    return {
        "deployment generation": dep["metadata"]["generation"],
        "deployment template": json.dumps(dep["spec"]["template"], sort_keys=True),
        "statefulset generation": sts["metadata"]["generation"],
        "pods": pods,
        "clusterrole rules": json.loads(crb.stdout)["rules"] if crb.returncode == 0 else None,
    }


def upgrade_noop():
    before = snapshot()
    run(HELM, "upgrade", RELEASE, CHART, "-n", NS, "--reuse-values", "--wait", "--timeout", "5m")
    time.sleep(5)
    after = snapshot()
    changed = [key for key in before if before[key] != after[key]]
    assert not changed, f"helm upgrade with the same values changed: {', '.join(changed)}"
    return "no new Deployment generation, no pod replaced, StatefulSet untouched"


def example_broker_and_uninstall():
    run(HELM, "upgrade", RELEASE, CHART, "-n", NS, "--reuse-values", "--set", "exampleBroker.enabled=true",
        "--wait", "--timeout", "5m")
    k("wait", "broker/demo", "--for=condition=Ready", "--timeout=300s", timeout=330)
    until("demo-client-credentials", lambda: k("get", "secret", "demo-client-credentials", check=False).returncode == 0, timeout=60)
    # What was applied with kubectl goes with kubectl; the example Broker goes with helm.
    k("delete", "acl/writers", "acl/readers", "token/writer", "token/reader", "token/outsider",
      "--ignore-not-found", "--wait=true", timeout=120)
    k("delete", "broker", BROKER, "--wait=true", timeout=120)
    run(HELM, "uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "5m")
    kinds = "all,configmaps,secrets,serviceaccounts,roles,rolebindings,leases,poddisruptionbudgets,persistentvolumeclaims,brokers,tokens,acls"
    allowed = {"configmap/kube-root-ca.crt", "serviceaccount/default"}

    def leftovers():
        # "deployment.apps/x" -> "deployment/x"
        names = {n.split("/", 1)[0].split(".", 1)[0] + "/" + n.split("/", 1)[1]
                 for n in k("get", kinds, "-o", "name").stdout.split()}
        return names - allowed

    try:
        until("the namespace to be empty", lambda: not leftovers(), timeout=180, interval=2)
    except AssertionError:
        raise AssertionError(f"left behind in {NS}: {sorted(leftovers())}")
    cluster = kubectl("get", "clusterroles,clusterrolebindings", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name").stdout.split()
    assert not cluster, f"cluster-scoped leftovers: {cluster}"
    crds = kubectl("get", "crd", "brokers.starling.dev", "tokens.starling.dev", "acls.starling.dev", "-o", "name", check=False).stdout.split()
    return f"example Broker demo came up via helm; after helm uninstall {NS} holds only {sorted(allowed)}; no ClusterRole/Binding left; CRDs kept by Helm's policy ({len(crds)} present)"


def diagnostics():
    say(f"---- diagnostics for {NS}")
    for args in (("get", "all,brokers,tokens,acls,secrets,leases", "-o", "wide"),
                 ("describe", "broker"),
                 ("logs", f"deployment/{RELEASE}-starling-operator", "--tail=80"),
                 ("logs", f"{BROKER}-0", "--tail=80"),
                 ("get", "events", "--sort-by=.lastTimestamp")):
        p = k(*args, check=False, timeout=60)
        say(f"$ kubectl -n {NS} {' '.join(args)}\n{p.stdout}{p.stderr}")


def cleanup(failed):
    pf = state.get("pf")
    if pf and pf.poll() is None:
        pf.terminate()
    if failed and os.environ.get("E2E_KEEP") == "1":
        say(f"e2e/cluster: E2E_KEEP=1: namespace {NS} and release {RELEASE} kept")
        return
    run(HELM, "uninstall", RELEASE, "-n", NS, "--wait", check=False, timeout=360)
    kubectl("delete", "namespace", NS, "--wait=false", "--ignore-not-found", check=False, timeout=60)


def main():
    say(f"e2e/cluster: KUBECONFIG={os.environ.get('KUBECONFIG')}")
    t0 = time.monotonic()
    try:
        step("cluster reachable, tools present", preflight, required=True)
        step("helm install into a fresh namespace", install, required=True)
        step("Broker, Tokens, ACLs Ready; credentials Secrets", apply_resources, required=True)
        step("kubectl port-forward to the Broker Service", port_forward, required=True)
        step("MQTT over TLS on 8883 with ca.crt (mosquitto_pub/sub)", mqtt_tls)
        step("HTTPS /broker/ on 443 (curl)", http_broker)
        step("WebSocket over TLS on 443 (topic stream, MQTT over WSS)", websockets_wss)
        step("ACL change by kubectl apply applies live", acl_live)
        step(f"kubectl delete token disconnects within {REVOKE_SECONDS:.0f} s", revoke)
        step("TLS Secret rotation without a pod restart", tls_rotation)
        step("helm upgrade with the same values changes nothing", upgrade_noop)
        step("example Broker via helm; helm uninstall leaves no orphans", example_broker_and_uninstall)
    except Stop:
        pass
    failed = results["failed"] > 0
    if failed:
        diagnostics()
    cleanup(failed)
    say(f"cluster-e2e: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped ({time.monotonic() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
