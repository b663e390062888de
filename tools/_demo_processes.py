"""What ``maskfl-demo`` runs: mosquitto, the agents (processes, or tasks in this process
with --in-process), the observer that watches the rounds, the coordinator and the
sampler of its store; started in that order and all stopped on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from maskfl.protocol.errors import MaskflError
from maskfl.tools._demo_fleet import DemoFleet, console_script
from maskfl.tools._demo_watch import Observer, StoreSampler, fetch_status
from maskfl.tools._supervise import Supervisor
from maskfl.tools.demo_agent import InProcessFleet


class DemoProcesses:
    """The demo's processes and tasks; ``timeline`` gets how long starting the agents and
    stopping everything took."""

    def __init__(
        self,
        logs: Path,
        *,
        devices: int,
        model: str,
        in_process: bool,
        say: Callable[[str], None],
        timeline: dict[str, float],
    ) -> None:
        self.logs = logs
        self.devices = devices
        self.model = model
        self.in_process = in_process
        self.say = say
        self.timeline = timeline
        self.supervisor = Supervisor(logs)
        self.inproc: InProcessFleet | None = None
        self.observer: Observer | None = None
        self.sampler: StoreSampler | None = None

    def check(self) -> None:
        """Raise if a process or an in-process agent has died."""
        self.supervisor.check()
        if self.observer is not None:
            self.observer.check()
        if self.inproc is not None:
            self.inproc.check()

    async def start(self, fleet: DemoFleet) -> None:
        """mosquitto, the agents (until they are connected), the observer, the coordinator
        (until it is ready) and the store sampler, in that order."""
        t = time.monotonic()
        broker = await asyncio.to_thread(
            self.supervisor.start_broker, fleet.broker_conf, fleet.broker_port
        )
        self.say(
            f"  mosquitto pid {broker.pid} on 127.0.0.1:{fleet.broker_port} "
            "(mutual TLS, per-device ACL)"
        )
        await self._start_agents(fleet)
        connected = await self._wait_agents(fleet, 60.0 + 0.5 * self.devices)
        self.timeline["agents_s"] = time.monotonic() - t
        self.say(
            f"  {connected}/{self.devices} agents connected "
            f"({self.timeline['agents_s']:.1f} s; logs in {self.logs})"
        )
        observer = Observer(
            fleet.observer_dir,
            fleet=fleet.fleet,
            model_id=self.model,
            host="127.0.0.1",
            port=fleet.broker_port,
        )
        await observer.start()
        self.observer = observer
        await self._start_coordinator(fleet)
        self.sampler = StoreSampler(fleet.coordinator_state)
        self.sampler.start()

    async def _start_agents(self, fleet: DemoFleet) -> None:
        """One process per device, or every agent in this process (--in-process)."""
        if self.in_process:
            _log_to_file(self.logs / "agents-in-process.log")
            self.inproc = InProcessFleet(
                [fleet.agent_toml(d) for d in fleet.device_ids], self.model
            )
            await self.inproc.start()
            return
        for device in fleet.device_ids:
            self.supervisor.start(
                f"agent-{device}",
                [
                    sys.executable,
                    "-m",
                    "maskfl.tools.demo_agent",
                    "--config",
                    str(fleet.agent_toml(device)),
                ],
            )

    async def _start_coordinator(self, fleet: DemoFleet) -> None:
        """The coordinator process, until its /status says ready (60 s at most)."""
        coordinator = self.supervisor.start(
            "coordinator",
            [
                *console_script("maskfl-coordinator", "maskfl.broker_coordinator.cli"),
                "run",
                "--config",
                str(fleet.coordinator_toml),
            ],
        )
        deadline = time.monotonic() + 60.0
        while True:
            self.supervisor.check()
            status = await fetch_status(fleet.http_port, 1.0)
            if status is not None and status.get("ready"):
                break
            if time.monotonic() > deadline:
                raise MaskflError(
                    f"the coordinator did not become ready within 60 s; see "
                    f"{self.logs}/coordinator.log"
                )
            await asyncio.sleep(0.2)
        self.say(
            f"  coordinator pid {coordinator.pid} ready (status http://127.0.0.1:{fleet.http_port}"
            f"/status, backend {status.get('backend', '?')}, "
            f"{status.get('word_bits', '?')}-bit words)"
        )

    async def _wait_agents(self, fleet: DemoFleet, limit_s: float) -> int:
        """Wait until every agent holds its broker connection (so round 1 finds them)."""
        deadline = time.monotonic() + limit_s
        log = self.logs / "mosquitto.log"
        while True:
            self.supervisor.check()
            if self.inproc is not None:
                self.inproc.check()
                count = self.inproc.connected()
            else:
                text = log.read_text(errors="replace") if log.exists() else ""
                count = sum(1 for d in fleet.device_ids if f" as {d} " in text)
            if count >= len(fleet.device_ids) or time.monotonic() > deadline:
                return count
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        """Everything started, in reverse; every process stopped (SIGTERM, then SIGKILL)."""
        t = time.monotonic()
        if self.sampler is not None:
            await self.sampler.stop()
        if self.observer is not None:
            with contextlib.suppress(Exception):
                await self.observer.stop()
        if self.inproc is not None:
            with contextlib.suppress(Exception):
                await self.inproc.stop()
        await asyncio.to_thread(self.supervisor.stop_all)
        self.timeline["shutdown_s"] = time.monotonic() - t


def _log_to_file(path: Path) -> None:
    """In-process agents log like agent processes do, but to one file, not the console."""
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
