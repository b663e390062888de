"""Killing a coordinator process at chosen instants, for the crash tests.

:class:`Proc` runs ``maskfl-coordinator run`` as a child process with its log in
a file. :class:`Killer` watches the broker and acts (SIGKILL, or holding the
coordinator's outbound bytes through :class:`~tests.support.proxy.HoldingProxy`)
the instant a chosen output arrives. :func:`round_row` reads the coordinator's
database from outside, to wait until a phase is committed; :func:`kill_with_output_held`
kills the coordinator at each phase boundary of round 1 with its output held back.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from maskfl.protocol.messages import GlobalModel, Receipt, decode_message
from maskfl.protocol.topics import TopicKind, parse_topic
from maskfl.testing.fleet import coordinator_command
from maskfl.testing.participants import wait_for
from tests.support.proxy import HoldingProxy


class Proc:
    """The coordinator as a child process, with its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                coordinator_command(self.config),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def kill9(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Killer:
    """SIGKILLs the coordinator the instant an armed output reaches the broker.

    A paho client on its own thread, subscribed to the round's sum dictionary,
    seed dictionaries, global model and receipts: the kill is sent from the
    callback that receives the armed output, not by the test's event loop, so it
    lands within a millisecond or so of the broker having the message. Triggers:
    ``sums``, ``seeds`` (the first seed dictionary), ``model`` (version >= 1) and
    ``receipt:<type>`` (the first ``accepted`` receipt for a message of that type:
    the others of its group commit are then committed but perhaps not yet sent).
    """

    def __init__(self, host: str, port: int, fleet: str) -> None:
        self._lock = threading.Lock()
        self._armed: str | None = None
        self._action: Callable[[], None] | None = None
        self._count = 0
        self.fired = threading.Event()
        self.kills: list[str] = []
        self.accepted: set[bytes] = set()
        """Digests of every message an ``accepted`` receipt answered."""
        self.last: dict[str, bytes] = {}
        """The last payload seen per topic (empty: a retained message cleared)."""
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"killer-{fleet}", protocol=mqtt.MQTTv5
        )
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        prefix = f"maskfl/v1/{fleet}"
        for topic in ("round", "round/+/sums", "round/+/seeds/+", "model/+/latest", "receipts/+"):
            self.client.subscribe(f"{prefix}/{topic}", qos=1)
        self.client.loop_start()

    def arm(self, trigger: str, pid: int) -> None:
        """SIGKILL ``pid`` on the first ``trigger``."""
        self.on(trigger, lambda: kill9(pid))

    def on(self, trigger: str, action: Callable[[], None], count: int = 1) -> None:
        """Run ``action`` (on the paho thread) on the ``count``-th ``trigger``."""
        with self._lock:
            self._armed, self._action, self._count = trigger, action, count
            self.fired.clear()

    def _trigger(self, msg: mqtt.MQTTMessage) -> str | None:
        kind = parse_topic(msg.topic).kind
        if kind is TopicKind.ROUND:
            return "round"
        if kind is TopicKind.SUMS:
            return "sums"
        if kind is TopicKind.SEEDS:
            return "seeds"
        body = decode_message(msg.payload, max_size=1 << 24).body
        if isinstance(body, GlobalModel):
            return "model" if body.version >= 1 else None  # v0 goes out at every start
        if isinstance(body, Receipt) and body.accepted and body.message_type is not None:
            self.accepted.add(body.message_digest)
            return f"receipt:{body.message_type.name.lower()}"
        return None

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.last[msg.topic] = msg.payload
        if not msg.payload:
            return
        trigger = self._trigger(msg)
        with self._lock:
            if trigger != self._armed or self._action is None:
                return
            self._count -= 1
            if self._count > 0:
                return
            self._action()
            self.kills.append(trigger)
            self._armed = self._action = None
            self.fired.set()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def round_row(db: Path, where: str) -> bool:
    """Round 1's row in the coordinator's database matches ``where``."""
    if not db.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            rows = conn.execute(f"SELECT 1 FROM rounds WHERE round_id = 1 AND {where}").fetchall()
        except sqlite3.OperationalError:
            return False
    return bool(rows)


async def kill_with_output_held(
    coordinator: Proc, killer: Killer, proxy: HoldingProxy, *, summers: int, what: str
) -> None:
    """Round 1, phase by phase: start the coordinator (which reaches the broker through
    ``proxy``), drop everything it sends from the moment the phase's input is out (round
    parameters, sum dictionary, all ``summers`` seed dictionaries), and SIGKILL it once
    its database shows the phase closed (for sum2: the round completed). It is left
    dead; the caller starts it once more."""
    db = coordinator.config.parent / "state" / "coordinator.db"
    steps = (
        ("round", 1, "phase = 'update'"),
        ("sums", 1, "phase = 'sum2'"),
        ("seeds", summers, "outcome = 'completed'"),
    )
    for trigger, count, done in steps:
        killer.on(trigger, proxy.hold, count)
        coordinator.start()
        await wait_for(killer.fired.is_set, 60, f"{what}: {trigger}")
        await wait_for(functools.partial(round_row, db, done), 90, f"{what}: {done}")
        coordinator.kill9()
        await proxy.release()
