"""A real browser against the HTTP interface and the WebSocket topic streams.

Headless Chromium (Debian's `chromium`, installed by e2e/run-python.sh) loads
a page this test serves itself from 127.0.0.1:<port>, a different origin from
the broker's http listener. The broker runs with an auth bundle, anonymous
clients denied and `[web] cors_origins` set to the page's origin. The page:

- opens `new WebSocket('ws://<broker>/browser/test?access_token=<secret>')`
  (raw frames) and a second one with `&envelope=json`; browsers cannot put an
  Authorization header on a WebSocket, and anonymous access is denied, so only
  the `?access_token` path can make them open. The test then publishes over
  MQTT (paho) and the page must receive that exact message on both;
- opens one with a bad access_token, which must fail without ever opening;
- sends a frame on a stream of browser/fromws (published to that topic);
- `fetch()`es POST and GET `/broker/browser/fromfetch` with
  `Authorization: Bearer` (a non-safelisted header: a CORS preflight) and
  reads the body and the exposed `MQTT-*` headers, and an unauthenticated GET
  whose 401 it must be able to read;

and POSTs everything it saw back to the test server's /event/<run>. A paho
subscriber checks the fetch POST and the WebSocket frame arrived over MQTT.

Negative control: the same page from a second port, an origin not in
cors_origins: its fetches must fail (CORS) and must not have published
anything, while its WebSockets still work (WebSockets are not subject to
CORS).

The browser is driven without extra dependencies: `chromium --headless=new
... URL` and the test waits (bounded) for the page's reports. Without a
runnable Chromium the test is skipped, except under CI=true, where it fails.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from broker import TARGET
from clients import TIMEOUT, V5, Client
from conftest import launch, shutdown
from test_auth import BROKER_NAME, Bundle

pytestmark = pytest.mark.skipif(TARGET != "starling", reason="the HTTP interface and topic streams are Starling's own")

# Bounds for what the page does (the page has its own, shorter, per-step
# timeouts so a failure reports what it saw instead of hanging).
PAGE_READY_TIMEOUT = 30.0  # browser start + page load + both streams open
PAGE_RESULT_TIMEOUT = 30.0

STREAM_TOPIC = "browser/test"
FETCH_TOPIC = "browser/fromfetch"
WS_SEND_TOPIC = "browser/fromws"


# ---------------------------------------------------------------------------
# Chromium


def chromium_binary() -> str | None:
    for cand in (
        os.environ.get("STARLING_E2E_CHROMIUM"),
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def require_chromium() -> str:
    """The browser binary, or skip (fail under CI=true) saying why not."""
    binary = chromium_binary()
    why = None
    if binary is None:
        why = "no chromium on PATH (e2e/run-python.sh installs Debian's `chromium`)"
    else:
        try:
            r = subprocess.run(
                [binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=30, text=True
            )
            if r.returncode != 0 or "chrom" not in r.stdout.lower():
                why = f"{binary} --version failed (rc {r.returncode}): {r.stdout.strip()} {r.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"{binary} --version did not run: {e}"
    if why:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and Chromium is not runnable: {why}")
        print(f"test_browser: skipped: {why}")
        pytest.skip(why)
    return binary


class Browser:
    """One headless Chromium with a fresh profile, loading one URL."""

    def __init__(self, binary: str, url: str, workdir: str, name: str):
        self.profile = tempfile.mkdtemp(prefix=f"profile-{name}-", dir=workdir)
        self.log_path = os.path.join(workdir, f"chromium-{name}.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--no-sandbox",  # root in a container
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--metrics-recording-only",
                "--password-store=basic",
                "--use-mock-keychain",
                "--remote-debugging-port=0",  # keeps new headless running until killed
                f"--user-data-dir={self.profile}",
                url,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,  # its own process group: zygote, renderers, gpu
        )

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return "\n".join(f.read().splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def exited(self) -> int | None:
        return self.proc.poll()

    def close(self) -> None:
        pgid = self.proc.pid  # start_new_session: the group id is the browser's pid
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # whatever of the group is left
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


# ---------------------------------------------------------------------------
# The page and the server that serves it and collects its reports

PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>starling browser e2e</title></head>
<body>
<script type="application/json" id="cfg">__CFG__</script>
<script>
"use strict";
const cfg = JSON.parse(document.getElementById("cfg").textContent);
const report = (kind, data) => fetch("/event/" + cfg.run, {
  method: "POST", headers: {"Content-Type": "application/json"},
  body: JSON.stringify(Object.assign({kind: kind}, data)),
});
const timeout = (p, ms, what) => Promise.race([
  p, new Promise((_, rej) => setTimeout(() => rej(new Error(what + " timed out")), ms)),
]);
const settle = async (p, ms, what) => {
  try { return {ok: true, value: await timeout(p, ms, what)}; }
  catch (e) { return {ok: false, error: String(e)}; }
};

function stream(path) {
  const s = {path: path, opened: false, errored: false, closeCode: null, messages: []};
  const ws = new WebSocket(cfg.ws + path);
  ws.binaryType = "arraybuffer";
  s.ws = ws;
  let opened, failed, closed, message;
  s.open = new Promise((res, rej) => { opened = res; failed = rej; });
  s.closed = new Promise((res) => { closed = res; });
  s.message = new Promise((res) => { message = res; });
  ws.onopen = () => { s.opened = true; opened(); };
  ws.onerror = () => { s.errored = true; };
  ws.onclose = (e) => {
    s.closeCode = e.code;
    failed(new Error(path + " closed with " + e.code + " before opening"));
    closed(e.code);
  };
  ws.onmessage = (e) => {
    const data = typeof e.data === "string" ? e.data : "[binary " + e.data.byteLength + " bytes]";
    s.messages.push(data);
    message(data);
  };
  return s;
}
const state = (s) => ({opened: s.opened, errored: s.errored, closeCode: s.closeCode, messages: s.messages});

async function call(url, init, headers) {
  try {
    const r = await fetch(url, init);
    const out = {ok: true, status: r.status, body: await r.text(), headers: {}};
    for (const h of headers || []) out.headers[h] = r.headers.get(h);
    return out;
  } catch (e) {
    return {ok: false, error: String(e)};
  }
}

async function main() {
  const out = {origin: location.origin, userAgent: navigator.userAgent};
  const tok = "access_token=" + encodeURIComponent(cfg.secret);
  const raw = stream("/" + cfg.streamTopic + "?" + tok);
  const env = stream("/" + cfg.streamTopic + "?" + tok + "&envelope=json");
  const bad = stream("/" + cfg.streamTopic + "?access_token=" + encodeURIComponent(cfg.badSecret));

  out.open = await settle(Promise.all([raw.open, env.open]), 15000, "opening the streams");
  await report("ready", {open: out.open});  // the test publishes over MQTT now

  // fetch(): Authorization is not a safelisted header, so each is preflighted.
  const auth = {"Authorization": "Bearer " + cfg.secret};
  const url = cfg.http + "/broker/" + cfg.fetchTopic;
  out.post = await call(url, {
    method: "POST", headers: Object.assign({"Content-Type": "text/plain"}, auth), body: cfg.fetchBody,
  });
  out.get = await call(url, {headers: auth}, ["MQTT-Topic", "MQTT-QoS", "MQTT-Retain", "Content-Type"]);
  out.anon = await call(url + "?wait=0", {}, ["WWW-Authenticate"]);

  out.rawMessage = await settle(raw.message, 10000, "a frame on the raw stream");
  out.envMessage = await settle(env.message, 10000, "a frame on the json stream");
  out.badClosed = await settle(bad.closed, 10000, "the bad-token stream to close");

  // A frame the page sends is published to the stream's topic (and comes
  // back on the same stream, which is subscribed to it).
  const chat = stream("/" + cfg.wsSendTopic + "?" + tok);
  out.chatOpen = await settle(chat.open, 10000, "opening the sending stream");
  if (out.chatOpen.ok) chat.ws.send(cfg.wsBody);
  out.chatEcho = await settle(chat.message, 10000, "the echo of the sent frame");

  out.raw = state(raw); out.env = state(env); out.bad = state(bad); out.chat = state(chat);
  for (const s of [raw, env, chat]) s.ws.close(1000);
  await report("result", out);
}
main().catch((e) => report("result", {fatal: String(e && e.stack || e)}));
</script>
</body></html>
"""


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A killed browser resets its keep-alive connections: not a failure.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class PageServer:
    """Serves PAGE for registered runs and queues what each page reports."""

    def __init__(self):
        self.runs: dict[str, dict] = {}
        self.events: dict[str, queue.Queue] = {}
        self.servers: list[_QuietServer] = []
        self.requests: list[str] = []

    def listen(self) -> str:
        """One more listener (a distinct origin); returns its origin."""
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):
                owner.requests.append(f"{self.server.server_address[1]} {fmt % args}")

            def _send(self, status: int, body: bytes = b"", ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def do_GET(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) == 2 and parts[0] == "page" and parts[1] in owner.runs:
                    cfg = json.dumps(owner.runs[parts[1]]).replace("</", "<\\/")
                    self._send(200, PAGE.replace("__CFG__", cfg).encode(), "text/html; charset=utf-8")
                else:
                    self._send(404 if parts != ["favicon.ico"] else 204)

            def do_POST(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                if len(parts) == 2 and parts[0] == "event" and parts[1] in owner.events:
                    try:
                        ev = json.loads(body)
                    except ValueError:
                        ev = {"kind": "garbage", "raw": body.decode("utf-8", "replace")}
                    owner.events[parts[1]].put(ev)
                    self._send(204)
                else:
                    self._send(404)

        srv = _QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, name="page-server", daemon=True).start()
        self.servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    def register(self, cfg: dict) -> str:
        run = uuid.uuid4().hex[:12]
        self.runs[run] = dict(cfg, run=run)
        self.events[run] = queue.Queue()
        return run

    def close(self) -> None:
        for s in self.servers:
            s.shutdown()
            s.server_close()


# ---------------------------------------------------------------------------


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="starling-browser-") as d:
        yield d


@pytest.fixture
def pages():
    p = PageServer()
    yield p
    p.close()


def http_request(method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None):
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def mqtt_client(broker, token: str, secret: str) -> Client:
    c = Client(broker.mqtt, V5)
    c.c.username_pw_set(token, secret)
    return c.connect()


def next_event(pages: PageServer, run: str, browser: Browser, timeout: float) -> dict:
    """The page's next report; fails early if the browser exits."""
    deadline = time.monotonic() + timeout
    q = pages.events[run]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no report from the page within {timeout}s (browser rc {browser.exited()})\n"
                f"page server requests:\n" + "\n".join(pages.requests[-20:]) + "\n"
                f"chromium log:\n{browser.log_tail()}"
            )
        try:
            return q.get(timeout=min(left, 0.5))
        except queue.Empty:
            if browser.exited() is not None and q.empty():
                raise AssertionError(
                    f"chromium exited with {browser.exited()} before the page reported\n{browser.log_tail()}"
                ) from None


def run_page(pages: PageServer, chromium: str, workdir: str, origin: str, cfg: dict, publish, name: str) -> dict:
    """Load the page from `origin`, publish (via `publish`) once its streams
    are open, and return its final report."""
    run = pages.register(cfg)
    browser = Browser(chromium, f"{origin}/page/{run}", workdir, name)
    try:
        ready = next_event(pages, run, browser, PAGE_READY_TIMEOUT)
        if ready.get("kind") == "result":  # the page failed before it was ready
            raise AssertionError(f"page {name} failed: {ready}")
        assert ready.get("kind") == "ready", ready
        assert ready["open"]["ok"], f"page {name}: the streams with ?access_token did not open: {ready}"
        publish()
        result = next_event(pages, run, browser, PAGE_RESULT_TIMEOUT)
        assert result.get("kind") == "result", result
        assert "fatal" not in result, f"page {name}: script error: {result['fatal']}"
        return result
    finally:
        browser.close()


def check_streams(res: dict, stream_payload: str, ws_body: str) -> None:
    """What every page, CORS or not, must see on its WebSockets."""
    assert res["rawMessage"] == {"ok": True, "value": stream_payload}, res["raw"]
    assert res["raw"]["messages"] == [stream_payload], res["raw"]
    assert res["envMessage"]["ok"], res["env"]
    assert json.loads(res["envMessage"]["value"]) == {
        "topic": STREAM_TOPIC,
        "payload": stream_payload,
        "encoding": "utf8",
        "qos": 1,  # published at QoS 1 below
        "retain": False,
    }
    assert len(res["env"]["messages"]) == 1, res["env"]
    # The bad token: the handshake is refused (403), so the browser sees an
    # error and an abnormal close, never an open.
    assert res["badClosed"]["ok"], res["bad"]
    assert res["bad"]["opened"] is False, res["bad"]
    assert res["bad"]["errored"] is True, res["bad"]
    assert res["bad"]["closeCode"] == 1006, res["bad"]
    assert res["bad"]["messages"] == [], res["bad"]
    # The frame the page sent was published and came back on its own stream.
    assert res["chatOpen"]["ok"], res["chat"]
    assert res["chatEcho"] == {"ok": True, "value": ws_body}, res["chat"]


def test_browser_websocket_access_token_and_cors_fetch(pages, workdir):
    chromium = require_chromium()

    allowed = pages.listen()
    blocked = pages.listen()  # another port: another origin, not in cors_origins
    assert allowed != blocked

    bundle = Bundle(os.path.join(workdir, "bundle.json"))
    secret = bundle.token("browser")
    bundle.rule("browser", ["browser"], ["browser/#"], ["publish", "subscribe"])
    bundle.write()
    broker = launch(
        {
            "STARLING_AUTH_BUNDLE": bundle.path,
            "STARLING_BROKER_NAME": BROKER_NAME,
            "STARLING_AUTH_ANONYMOUS": "deny",
            "STARLING_WEB_CORS_ORIGINS": allowed,
        },
        name="browser",
    )
    clients: list[Client] = []
    try:
        host, port = broker.http
        base = f"http://{host}:{port}"

        # Plain-HTTP sanity first, so a browser failure below is easier to
        # blame: the preflight answers for the allowed origin only.
        pre = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        st, h, _ = http_request("OPTIONS", f"{base}/broker/{FETCH_TOPIC}", dict(pre, Origin=allowed))
        assert st == 200 and h.get("access-control-allow-origin") == allowed, (st, h)
        assert "authorization" in h.get("access-control-allow-headers", "").lower(), h
        st, h, _ = http_request("OPTIONS", f"{base}/broker/{FETCH_TOPIC}", dict(pre, Origin=blocked))
        assert "access-control-allow-origin" not in h, (st, h)
        # Anonymous is denied: without ?access_token a stream is refused.
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        conn.request(
            "GET",
            f"/{STREAM_TOPIC}",
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        st = conn.getresponse().status
        conn.close()
        assert st == 403, st

        sub = mqtt_client(broker, "browser", secret)
        clients.append(sub)
        sub.subscribe(FETCH_TOPIC, 0)
        sub.subscribe(WS_SEND_TOPIC, 0)
        pub = mqtt_client(broker, "browser", secret)
        clients.append(pub)

        def cfg(tag: str) -> dict:
            return {
                "ws": f"ws://{host}:{port}",
                "http": base,
                "secret": secret,
                "badSecret": "browser-" + uuid.uuid4().hex,
                "streamTopic": STREAM_TOPIC,
                "fetchTopic": FETCH_TOPIC,
                "wsSendTopic": WS_SEND_TOPIC,
                "fetchBody": f"posted by fetch() from the {tag} page",
                "wsBody": f"sent on a WebSocket by the {tag} page",
            }

        # ---- the page from the allowed origin ----
        t0 = time.monotonic()
        ok_cfg = cfg("allowed")
        ok_payload = "published over MQTT for the allowed page"
        res = run_page(
            pages, chromium, workdir, allowed, ok_cfg, lambda: pub.publish(STREAM_TOPIC, ok_payload, qos=1), "allowed"
        )
        print(f"allowed page: {time.monotonic() - t0:.2f}s, {res['userAgent']}")
        assert res["origin"] == allowed

        check_streams(res, ok_payload, ok_cfg["wsBody"])

        post = res["post"]
        assert post["ok"], f"fetch POST from an allowed origin failed (CORS?): {post}"
        assert post["status"] == 200, post
        assert json.loads(post["body"]) == {"matched": 1}, post  # the paho subscriber
        get = res["get"]
        assert get["ok"], f"fetch GET from an allowed origin failed (CORS?): {get}"
        assert get["status"] == 200, get
        assert get["body"] == ok_cfg["fetchBody"], get
        assert get["headers"] == {
            "MQTT-Topic": FETCH_TOPIC,
            "MQTT-QoS": "0",
            "MQTT-Retain": "false",
            "Content-Type": "application/octet-stream",
        }, get
        anon = res["anon"]
        assert anon["ok"], f"the 401 of an unauthenticated fetch was not readable (CORS headers on errors?): {anon}"
        assert anon["status"] == 401, anon
        assert json.loads(anon["body"])["rule"] == "authentication", anon

        m = sub.get_topic(FETCH_TOPIC)
        assert (m.payload, m.qos, m.retain) == (ok_cfg["fetchBody"].encode(), 0, False)
        m = sub.get_topic(WS_SEND_TOPIC)
        assert (m.payload, m.qos, m.retain) == (ok_cfg["wsBody"].encode(), 0, False)

        # ---- the same page from an origin not in cors_origins ----
        t0 = time.monotonic()
        no_cfg = cfg("blocked")
        no_payload = "published over MQTT for the blocked page"
        res = run_page(
            pages, chromium, workdir, blocked, no_cfg, lambda: pub.publish(STREAM_TOPIC, no_payload, qos=1), "blocked"
        )
        print(f"blocked page: {time.monotonic() - t0:.2f}s")
        assert res["origin"] == blocked

        # WebSockets are not subject to CORS.
        check_streams(res, no_payload, no_cfg["wsBody"])
        # Every fetch fails: the preflighted ones at the preflight, the
        # simple GET because its response has no Access-Control-Allow-Origin.
        for what in ("post", "get", "anon"):
            r = res[what]
            assert r["ok"] is False and "Failed to fetch" in r["error"], f"{what} from a blocked origin: {r}"
        # The POST never reached the broker: the last value is still the
        # allowed page's, and the paho subscriber got only the frame.
        st, h, body = http_request(
            "GET", f"{base}/broker/{FETCH_TOPIC}?wait=0", {"Authorization": f"Bearer {secret}"}
        )
        assert (st, body) == (200, ok_cfg["fetchBody"].encode()), (st, h, body)
        m = sub.get_topic(WS_SEND_TOPIC)
        assert m.payload == no_cfg["wsBody"].encode()
        assert [(x.topic, x.payload) for x in sub.drain(0.0)] == []
    finally:
        for c in clients:
            c.close()
        shutdown(broker)
