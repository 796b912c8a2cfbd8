"""Start and stop the real broker process for the end-to-end tests.

The broker under test is the `starling-broker` binary (env STARLING_BIN,
default target/debug/starling-broker). It is configured only through
`STARLING_<SECTION>_<KEY>` environment variables, binds every listener to
127.0.0.1:0 and announces the ports it actually bound in its startup banner:

    listener mqtt   mqtt://127.0.0.1:40123
    ...
    ready

We read stdout until `ready` (bounded by a timeout, never a sleep).

For validating the *test logic* only, STARLING_E2E_BROKER=mosquitto runs
Debian's mosquitto instead, mapping the few limits both brokers share. That
mode is never what CI runs.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BIN = REPO / "target" / "debug" / "starling-broker"
LISTENER_RE = re.compile(r"^\s*listener (\w+)\s+\w+://(\S+)")
READY_TIMEOUT = 20.0

TARGET = os.environ.get("STARLING_E2E_BROKER", "starling").strip().lower()


def split_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    host = host.strip("[]")
    return host, int(port)


class BrokerFailed(AssertionError):
    pass


class Broker:
    """One running broker process."""

    kind = "starling"

    def __init__(self, env: dict[str, str] | None = None, name: str = "broker", args: list[str] | None = None):
        self.name = name
        self.extra_env = dict(env or {})
        self.args = list(args or [])
        self.listeners: dict[str, tuple[str, int]] = {}
        self.proc: subprocess.Popen | None = None
        self.stdout_lines: list[str] = []
        self._tmp = tempfile.mkdtemp(prefix=f"starling-e2e-{name}-")
        self._stderr_path = os.path.join(self._tmp, "stderr.log")
        self._stderr_file = None
        self._stopped_by_us = False

    # ---- capability flags (mosquitto mode lacks some features) ----
    def supports(self, feature: str) -> bool:
        return True

    @property
    def mqtt(self) -> tuple[str, int]:
        return self.listeners["mqtt"]

    @property
    def http(self) -> tuple[str, int]:
        return self.listeners["http"]

    def stderr_text(self) -> str:
        try:
            with open(self._stderr_path, "r", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stderr_tail(self, n: int = 60) -> str:
        return "\n".join(self.stderr_text().splitlines()[-n:])

    def start(self) -> "Broker":
        binary = os.environ.get("STARLING_BIN") or str(DEFAULT_BIN)
        if not os.path.isabs(binary):
            binary = str(REPO / binary)
        if not os.path.exists(binary):
            raise BrokerFailed(
                f"broker binary {binary} does not exist: build it first "
                "(cargo build -p starling-broker) or set STARLING_BIN"
            )
        # A clean environment: no inherited STARLING_* setting may change what
        # the tests think they configured.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STARLING_")}
        env.update(
            {
                "STARLING_MQTT_BIND": "127.0.0.1:0",
                "STARLING_HTTP_BIND": "127.0.0.1:0",
                "STARLING_ADMIN_BIND": "127.0.0.1:0",
                "STARLING_DATA_DIR": os.path.join(self._tmp, "data"),
            }
        )
        env.update(self.extra_env)
        self._stderr_file = open(self._stderr_path, "wb")
        self.proc = subprocess.Popen(
            [binary, *self.args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr_file,
            cwd=self._tmp,
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump():
            assert self.proc and self.proc.stdout
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                self.stdout_lines.append(line)
                lines.put(line)
            lines.put(None)

        # Keeps draining stdout for the broker's whole life so it never blocks
        # on a full pipe.
        threading.Thread(target=pump, name=f"{self.name}-stdout", daemon=True).start()

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise BrokerFailed(
                    f"broker did not print 'ready' within {READY_TIMEOUT}s\n"
                    f"stdout:\n" + "\n".join(self.stdout_lines) + "\nstderr:\n" + self.stderr_tail()
                )
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise BrokerFailed(
                    f"broker exited with {self.proc.returncode} before 'ready'\n"
                    f"stdout:\n" + "\n".join(self.stdout_lines) + "\nstderr:\n" + self.stderr_tail()
                )
            m = LISTENER_RE.match(line)
            if m:
                self.listeners[m.group(1)] = split_hostport(m.group(2))
            elif line.strip() == "ready":
                break
        if "mqtt" not in self.listeners:
            self._kill()
            raise BrokerFailed("banner listed no mqtt listener:\n" + "\n".join(self.stdout_lines))
        return self

    def check_alive(self) -> None:
        """Fail if the broker exited on its own or logged a panic."""
        if self.proc is None:
            return
        rc = self.proc.poll()
        if rc is not None and not self._stopped_by_us:
            raise BrokerFailed(f"{self.name} exited on its own with {rc}\nstderr:\n{self.stderr_tail()}")
        self.check_no_panic()

    def check_no_panic(self) -> None:
        text = self.stderr_text()
        if "panicked" in text:
            idx = text.index("panicked")
            raise BrokerFailed(f"{self.name} panicked:\n{text[max(0, idx - 2000): idx + 4000]}")

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def kill9(self) -> None:
        """SIGKILL, as a crash: nothing is flushed, nothing is said goodbye to."""
        self._stopped_by_us = True
        self._kill()
        self.check_no_panic()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a deadline; then fail on panic / self-exit."""
        if self.proc is None:
            return
        exited_on_its_own = self.proc.poll() is not None and not self._stopped_by_us
        if self.proc.poll() is None:
            self._stopped_by_us = True
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._stderr_file:
            self._stderr_file.close()
        try:
            if exited_on_its_own:
                raise BrokerFailed(
                    f"{self.name} exited on its own with {self.proc.returncode}\nstderr:\n{self.stderr_tail()}"
                )
            self.check_no_panic()
        finally:
            if not os.environ.get("STARLING_E2E_KEEP_LOGS"):
                shutil.rmtree(self._tmp, ignore_errors=True)


class MosquittoBroker(Broker):
    """Debian's mosquitto, for validating test logic only (STARLING_E2E_BROKER=mosquitto)."""

    kind = "mosquitto"
    MAP = {
        "STARLING_LIMITS_MAX_PACKET_SIZE": "max_packet_size",
        "STARLING_LIMITS_MAX_KEEPALIVE": "max_keepalive",
        "STARLING_LIMITS_MAX_QUEUED_MESSAGES": "max_queued_messages",
    }

    def supports(self, feature: str) -> bool:
        return feature not in {"connect_timeout", "websocket"}

    def start(self) -> "Broker":
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf = [f"listener {port} 127.0.0.1", "allow_anonymous true", "log_dest stderr", "log_type all"]
        for k, v in self.extra_env.items():
            if k in self.MAP:
                conf.append(f"{self.MAP[k]} {v}")
        path = os.path.join(self._tmp, "mosquitto.conf")
        with open(path, "w") as f:
            f.write("\n".join(conf) + "\n")
        self._stderr_file = open(self._stderr_path, "wb")
        self.proc = subprocess.Popen(
            [binary, "-c", path], stdin=subprocess.DEVNULL, stdout=self._stderr_file, stderr=self._stderr_file
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:  # mosquitto has no readiness banner: poll the port (validation mode only)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self._kill()
                    raise BrokerFailed("mosquitto did not start:\n" + self.stderr_tail())
                time.sleep(0.05)
        self.listeners["mqtt"] = ("127.0.0.1", port)
        return self


def start_broker(env: dict[str, str] | None = None, name: str = "broker") -> Broker:
    cls = MosquittoBroker if TARGET == "mosquitto" else Broker
    return cls(env, name).start()
