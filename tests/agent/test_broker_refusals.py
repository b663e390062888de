"""What a real agent process does when the broker refuses it (issue 10, item 7).

A fleet made by ``maskfl-provision``, its generated mosquitto (TLS, CRL, ACL) and
``maskfl-agent run`` from the device's bundle, as an operator runs them:

* revoked and the broker reloaded at once (what the systemd path unit does): the
  broker cuts the device off before any revocation list reaches it, and refuses its
  certificate with the TLS alert ``certificate revoked``. The agent recognises that
  alert and stops for good with exit status 2, one ERROR line, no traceback;
* added while the broker has not reloaded its ACL: the broker accepts the TLS
  connection but refuses every publish with ``Not authorized (135)``. The agent logs
  one line naming the cause and retries with a growing back-off (not 189 times in
  15 s); after the reload it connects, and SIGTERM stops it cleanly.
"""

from __future__ import annotations

import itertools
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent.test_process import AgentProcess
from tests.broker_coordinator.provision.conftest import (
    Broker,
    provision,
    running_fleet_broker,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(90)]

WAIT_S = 30.0


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Broker]:
    with running_fleet_broker(tmp_path, ["dev-a"]) as broker:
        yield broker


def run_agent(broker: Broker, device: str, workdir: Path, **env: str) -> AgentProcess:
    bundle = broker.root / "devices" / device
    workdir.mkdir(parents=True, exist_ok=True)
    return AgentProcess(
        bundle / "agent.toml",
        workdir / f"{device}.log",
        env={
            "MASKFL__BROKER__HOST": "localhost",
            "MASKFL__BROKER__PORT": str(broker.port),
            "MASKFL__STATE__DIR": str(workdir / f"state-{device}"),
            **env,
        },
    )


def wait_until(what: str, done: Callable[[], bool], agent: AgentProcess) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert agent.proc.poll() is None or done(), f"agent exited before {what}:\n{agent.text()}"
        assert time.monotonic() < deadline, f"no {what} in {WAIT_S} s:\n{agent.text()}"
        time.sleep(0.02)  # inherent: an agent process's log and state, read from outside


def clean(text: str) -> None:
    assert "Traceback" not in text, text
    assert "Task exception was never retrieved" not in text, text
    assert "never awaited" not in text, text


def test_a_crl_reload_cuts_a_running_agent_off_and_it_exits_2(
    fleet: Broker, tmp_path: Path
) -> None:
    agent = run_agent(fleet, "dev-a", tmp_path, MASKFL__HEARTBEAT__INTERVAL_S="1")
    try:
        wait_until("connection", lambda: "connected to localhost" in agent.text(), agent)
        provision(fleet.root, "revoke", "dev-a")
        fleet.reload()  # CRL and ACL at once; no revocation list reaches the device
        assert agent.proc.wait(WAIT_S) == 2, agent.text()
    finally:
        if agent.proc.poll() is None:
            agent.kill()
    text = agent.text()
    clean(text)
    errors = [line for line in text.splitlines() if " ERROR " in line or "ERROR" in line]
    assert len(errors) == 1, text
    assert "as revoked" in errors[0] and "certificate revoked" in errors[0], errors[0]
    # The advice covers a rotated device: install the new bundle, not add-device --force.
    assert "install its new bundle" in errors[0] and "do not run add-device --force" in errors[0]
    # The broker refused the handshake: mosquitto logs it as a failed connection, or, when
    # the agent's probe closes first (seen under load), as a protocol error.
    log = fleet.mosquitto.log()
    assert "Client connection from 127.0.0.1 failed" in log or "rotocol error" in log, log


def test_an_unloaded_acl_is_one_line_and_a_growing_back_off(fleet: Broker, tmp_path: Path) -> None:
    provision(fleet.root, "add-device", "dev-b")  # the broker is not reloaded
    agent = run_agent(
        fleet,
        "dev-b",
        tmp_path,
        MASKFL__BROKER__RECONNECT_MIN_S="0.4",
        MASKFL__BROKER__RECONNECT_MAX_S="3.2",
    )
    seen: list[float] = []

    def connects() -> int:
        return fleet.mosquitto.log().count("as dev-b (p5")

    try:
        for count in range(1, 5):
            wait_until(f"connection {count}", lambda c=count: connects() >= c, agent)  # type: ignore[misc]
            seen.append(time.monotonic())
        fleet.reload()
        wait_until("recovery", lambda: "connected again after" in agent.text(), agent)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(WAIT_S) == 0, agent.text()
    finally:
        if agent.proc.poll() is None:
            agent.kill()
    text = agent.text()
    clean(text)
    # Back-off steps 0.4, 0.8, 1.6 s with equal jitter: each wait is at least half its step.
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    for gap, step in zip(gaps, (0.4, 0.8, 1.6), strict=True):
        assert gap >= step / 2, gaps
    warnings = [line for line in text.splitlines() if "has not loaded this client's ACL" in line]
    assert len(warnings) == 1, text
    assert "Not authorized (135)" in warnings[0] and "reload mosquitto" in warnings[0]
    assert len(re.findall("connected again after", text)) == 1, text


def test_two_agents_on_one_bundle_say_so_once_and_back_off(fleet: Broker, tmp_path: Path) -> None:
    """The broker gives the session to whichever connected last; each agent logs the
    likely cause once and takes the session back ever more slowly (was: every second,
    forever, a line each time)."""
    env = {"MASKFL__BROKER__RECONNECT_MIN_S": "0.2", "MASKFL__BROKER__RECONNECT_MAX_S": "1.6"}
    first = run_agent(fleet, "dev-a", tmp_path / "one", **env)
    second = run_agent(fleet, "dev-a", tmp_path / "two", **env)
    cause = "another process uses this client's identity"
    try:
        for agent in (first, second):
            wait_until("the takeover diagnosis", lambda a=agent: cause in a.text(), agent)  # type: ignore[misc]
        takeovers = fleet.mosquitto.log().count("already connected, closing old connection")
        started = time.monotonic()
        wait_until(
            "more takeovers",
            lambda: (
                fleet.mosquitto.log().count("already connected, closing old connection")
                >= takeovers + 4
            ),
            first,
        )
        # Four takeovers at the back-off's cap (waits of 0.8 .. 1.6 s, one per side):
        elapsed = time.monotonic() - started
        assert elapsed >= 4 * 0.8 / 2, elapsed
        for agent in (first, second):
            agent.proc.send_signal(signal.SIGTERM)
        for agent in (first, second):
            assert agent.proc.wait(WAIT_S) == 0, agent.text()
    finally:
        for agent in (first, second):
            if agent.proc.poll() is None:
                agent.kill()
    for agent in (first, second):
        text = agent.text()
        clean(text)
        assert text.count(cause) == 1, text
