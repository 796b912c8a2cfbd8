import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from broker import TARGET, Broker, start_broker  # noqa: E402
from clients import V5, V311, ClientFactory  # noqa: E402

_live: list[Broker] = []


def pytest_report_header(config):
    if TARGET == "mosquitto":
        return "broker under test: Debian mosquitto (STARLING_E2E_BROKER=mosquitto, test-logic validation only)"
    return f"broker under test: {os.environ.get('STARLING_BIN') or 'target/debug/starling-broker'}"


def launch(env=None, name="broker") -> Broker:
    b = start_broker(env, name)
    _live.append(b)
    return b


def shutdown(b: Broker) -> None:
    try:
        b.stop()
    finally:
        if b in _live:
            _live.remove(b)


@pytest.fixture(scope="module")
def broker(request):
    """One broker per test module; tests use unique topics and client ids."""
    env = getattr(request.module, "BROKER_ENV", None)
    b = launch(env, name=request.module.__name__)
    yield b
    shutdown(b)


@pytest.fixture
def run_broker():
    """Start a broker with a specific configuration for one test."""
    started = []

    def start(env=None, name="custom"):
        b = launch(env, name)
        started.append(b)
        return b

    yield start
    for b in started:
        shutdown(b)


@pytest.fixture(autouse=True)
def _broker_health():
    """After each test: every broker this run started is alive and has not panicked,
    so a crash is blamed on the test that caused it."""
    yield
    for b in list(_live):
        b.check_alive()


@pytest.fixture
def clients(broker):
    f = ClientFactory(broker.mqtt)
    yield f
    f.close_all()


@pytest.fixture(params=[V311, V5], ids=["v311", "v5"])
def version(request):
    return request.param
