"""The test bed of ``maskfl-bench scale``: mosquittos (a core and edge brokers bridged to
it), the coordinator process, simulated summers, an idle fleet in processes of its own,
and one publisher process per round for the updaters' frames; what each round cost.

The coordinator gets a CPU of its own (``--coordinator-cpu``, where the machine has two
or more): everything else the bed runs (brokers, the idle fleet's processes, the
publisher, the summers and this process) is confined to the other CPUs. On a 2-core
machine the 100k-device fleet's 13 processes otherwise share the coordinator's cores,
and a round "under heartbeats" measured the simulator's contention as much as the
coordinator (a 1,000-updater round 5.15 s against 2.59 s paused, at load 7-11).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from maskfl.protocol.chunking import split_payload
from maskfl.protocol.crypto import new_seed, seal_seed
from maskfl.protocol.masking import MaskConfig, mask_update
from maskfl.protocol.messages import (
    RoundParams,
    SumDict,
    Update,
    decode_message,
    encode_message,
    open_sum_dict,
)
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import free_port
from maskfl.testing.fleet import SimFleet, coordinator_command
from maskfl.testing.participants import Behaviour, SimParticipant
from maskfl.tools._bench_publish import records
from maskfl.tools._scale_procs import (
    CHUNK,
    FLEET,
    P_SUM,
    SUMMERS,
    Broker,
    affinity,
    all_proc_cpu,
    coordinator_config,
    cpu_busy,
    cpu_busy_split,
    cpu_jiffies,
    cpu_times,
    others_cpu,
    proc_cpu,
    proc_io,
    proc_vm,
    round_entry,
    round_observer,
    round_record,
    softirqs,
    softirqs_delta,
    start_broker,
)
from maskfl.tools._supervise import Child, Supervisor
from maskfl.transport import MqttTransport


def groups_of(args: argparse.Namespace) -> int:
    """--groups: g, the mask groups of every round (1 when not given)."""
    return int(getattr(args, "groups", 1) or 1)


def pinning(cpu: int, available: set[int]) -> dict[str, list[int]] | None:
    """The coordinator on ``cpu``, the rest of the bed on the other CPUs of ``available``;
    None (nothing pinned) when ``cpu`` is negative or fewer than two CPUs are available."""
    if cpu < 0 or len(available) < 2:
        return None
    if cpu not in available:
        raise SystemExit(
            f"maskfl-bench scale: --coordinator-cpu {cpu}: this process may use CPUs "
            f"{sorted(available)}; pick one of them, or -1 not to pin"
        )
    return {"coordinator": [cpu], "bed": sorted(available - {cpu})}


def _pin_threads(cpus: Any) -> None:
    """Every thread of this process onto ``cpus``."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that has just exited
            os.sched_setaffinity(int(tid), cpus)


@dataclass
class Bed:
    """Brokers, a coordinator, an idle fleet, an observer; everything stopped on exit."""

    work: Path
    sup: Supervisor
    args: argparse.Namespace
    fleet: SimFleet
    brokers: list[Broker]
    coordinator: Child
    http_port: int
    observer: MqttTransport
    idle: list[tuple[Child, Path]] = field(default_factory=list)
    idle_target: int = 0
    params: dict[int, asyncio.Future[RoundParams]] = field(default_factory=dict)
    sums: dict[int, asyncio.Future[SumDict]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    background: int | None = None
    fleet_cpu_share: float = 0.0
    cpus: dict[str, list[int]] | None = None
    publisher_affinity: dict[str, int] = field(default_factory=dict)
    """The CPUs of the coordinator and of the rest of the bed; None: not pinned."""

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        work: Path,
        *,
        m: int,
        n_max: int,
        updates: int,
        idle: int,
        args: argparse.Namespace,
        models: bool = False,
        rounds: int = 1,
    ) -> AsyncIterator[Bed]:
        sup = Supervisor(work / "logs")
        original = os.sched_getaffinity(0)
        cpus = pinning(getattr(args, "coordinator_cpu", -1), original)
        if cpus is not None:
            # Children inherit the CPUs of the thread that starts them; every thread of
            # this process goes to the bed's CPUs (numpy's OpenBLAS worker, started at
            # import, would otherwise keep all of them, the coordinator's included).
            _pin_threads(cpus["bed"])
        try:
            edges = -(-idle // args.per_broker) if idle > args.per_broker else 0
            core = start_broker(work, sup, "core", None)
            brokers = [core] + [
                start_broker(work, sup, f"edge{i}", core.port) for i in range(edges)
            ]
            fleet = SimFleet(fleet=FLEET)
            http_port = free_port()
            config = coordinator_config(
                fleet,
                work,
                core_port=core.port,
                http_port=http_port,
                m=m,
                n_max=n_max,
                updates=updates,
                groups=groups_of(args),
                rounds=rounds,
            )
            observer = await round_observer(core.port)
            bed = cls(work, sup, args, fleet, brokers, None, http_port, observer)  # type: ignore[arg-type]
            bed.cpus = cpus
            reader = asyncio.create_task(bed._observe())
            try:
                if cpus is not None:
                    os.sched_setaffinity(0, cpus["coordinator"])
                try:
                    bed.coordinator = sup.start("coordinator", coordinator_command(config))
                finally:
                    if cpus is not None:
                        os.sched_setaffinity(0, cpus["bed"])
                if cpus is not None:  # what the coordinator got, as the kernel says
                    cpus["coordinator"] = sorted(os.sched_getaffinity(bed.coordinator.pid))
                await bed._until_ready()
                bed._start_idle(idle, models)
                yield bed
            finally:
                bed._note_rss()
                reader.cancel()
                await observer.disconnect()
        finally:
            sup.stop_all()
            _pin_threads(original)

    # -- plumbing

    def _future(self, table: dict[int, asyncio.Future[Any]], rid: int) -> asyncio.Future[Any]:
        if rid not in table:
            table[rid] = asyncio.get_running_loop().create_future()
        return table[rid]

    async def _observe(self) -> None:
        async for msg in self.observer.messages():
            if not msg.payload:
                continue
            signed = decode_message(msg.payload, max_size=1 << 20)
            body, rid = signed.body, int(signed.header.round_id)
            table: dict[int, asyncio.Future[Any]] | None = None
            if isinstance(body, RoundParams):
                table = self.params  # type: ignore[assignment]
            elif isinstance(body, SumDict):
                table = self.sums  # type: ignore[assignment]
            if table is not None:
                fut = self._future(table, rid)
                if not fut.done():
                    fut.set_result(body)

    def _start_idle(self, k: int, models: bool) -> None:
        self.idle_target = k
        edges = self.brokers[1:] or self.brokers
        per = self.args.per_process
        start = 0
        procs = max(-(-k // per), len(edges) if k else 0)
        for i in range(procs):
            count = k // procs + (1 if i < k % procs else 0)
            status = self.work / f"idle{i}.json"
            broker = edges[i % len(edges)]
            argv = [
                sys.executable,
                "-m",
                "maskfl.testing.idle_fleet",
                "--port",
                str(broker.port),
                "--fleet",
                FLEET,
                "--first",
                str(start),
                "--count",
                str(count),
                "--interval",
                str(self.args.interval),
                "--keepalive",
                str(int(max(60, 4 * self.args.interval))),
                "--status",
                str(status),
            ] + (["--models"] if models else [])
            self.idle.append((self.sup.start(f"idle{i}", argv), status))
            start += count

    def pause_fleet(self, paused: bool) -> None:
        self.background = None  # the heartbeat background changes with it
        for child, _ in self.idle:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def fleet_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for _, status in self.idle:
            with contextlib.suppress(OSError, ValueError):
                for key, v in json.loads(status.read_text()).items():
                    if key != "pid":
                        total[key] = total.get(key, 0) + int(v)
        return total

    def _heartbeats(self) -> int:
        """Heartbeats the idle fleet has sent so far (0 without one)."""
        return self.fleet_counts().get("heartbeats", 0)

    async def wait_connected(self) -> None:
        """Until every idle device is connected (or failed), then one heartbeat interval."""
        if not self.idle_target:
            return
        deadline = time.monotonic() + 60 + self.idle_target / 200
        while True:
            self.sup.check()
            c = self.fleet_counts()
            if c.get("connected", 0) + c.get("failed", 0) + c.get("refused", 0) >= self.idle_target:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"idle fleet: {c} of {self.idle_target} after the deadline")
            await asyncio.sleep(1)
        await asyncio.sleep(self.args.interval + 2)  # every device has beaten once

    async def idle_load(self, window: float) -> dict[str, Any]:
        await self.wait_connected()
        pid = self.coordinator.pid
        others = [b.child.pid for b in self.brokers] + [c.pid for c, _ in self.idle]
        hb0, cpu0, t0 = self.fleet_counts().get("heartbeats", 0), proc_cpu(pid), time.monotonic()
        rest0 = sum(proc_cpu(p) for p in others)
        await asyncio.sleep(window)
        hb1, cpu1, t1 = self.fleet_counts().get("heartbeats", 0), proc_cpu(pid), time.monotonic()
        rest1 = sum(proc_cpu(p) for p in others)
        self.fleet_cpu_share = round((rest1 - rest0) / (t1 - t0), 3)
        status = await self.get("/status")
        rate = (hb1 - hb0) / (t1 - t0)
        if not self.idle_target:
            return {
                "window_s": round(t1 - t0, 1),
                "heartbeats_per_s": 0.0,
                "cpu_share_of_one_core": round((cpu1 - cpu0) / (t1 - t0), 4),
            }
        return {
            "window_s": round(t1 - t0, 1),
            "heartbeats_per_s": round(rate, 1),
            "cpu_share_of_one_core": round((cpu1 - cpu0) / (t1 - t0), 4),
            "cpu_us_per_heartbeat": round((cpu1 - cpu0) / max(1, hb1 - hb0) * 1e6, 1),
            "brokers_and_simulated_fleet_cpu_cores": self.fleet_cpu_share,
            "devices_alive": status.get("devices_alive"),
        }

    async def get(self, path: str) -> dict[str, Any]:
        def fetch() -> dict[str, Any]:
            url = f"http://127.0.0.1:{self.http_port}{path}"
            with urllib.request.urlopen(url, timeout=30) as r:
                data: dict[str, Any] = json.loads(r.read())
                return data

        return await asyncio.to_thread(fetch)

    async def _until_ready(self) -> None:
        """Until the coordinator's /readyz says 200 (its database open, its broker link up):
        a row measures the running coordinator, not its start."""

        def ready() -> bool:
            url = f"http://127.0.0.1:{self.http_port}/readyz"
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return bool(r.status == 200)
            except OSError:  # not listening yet, or 503 (urllib's HTTPError)
                return False

        deadline = time.monotonic() + 120
        while not await asyncio.to_thread(ready):
            self.sup.check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the coordinator's /readyz (port {self.http_port}) said no for 120 s"
                )
            await asyncio.sleep(0.1)

    def _note_rss(self) -> None:
        for child in [self.coordinator, *(b.child for b in self.brokers)]:
            if child is not None:
                self.rss[child.name] = max(self.rss.get(child.name, 0), proc_vm(child.pid, "VmHWM"))

    def peak_rss(self) -> dict[str, float]:
        self._note_rss()
        brokers = [v for k, v in self.rss.items() if k != "coordinator"]
        return {
            "coordinator": round(self.rss.get("coordinator", 0) / 1024, 1),
            "core_broker": round(self.rss.get("core", 0) / 1024, 1),
            "brokers_total": round(sum(brokers) / 1024, 1),
        }

    def broker_bytes_out(self) -> int:
        return sum(proc_io(b.child.pid, "wchar") for b in self.brokers)

    async def settle(self) -> int:
        """The brokers' outbound byte count once a burst is over.

        Heartbeats keep it growing (forwarded to the coordinator, and across bridges),
        so "over" means: one second in which it grew by less than 1 MB more than
        twice the heartbeat background of the quietest second seen so far.
        """
        last = self.broker_bytes_out()
        for _ in range(300):
            await asyncio.sleep(1.0)
            now = self.broker_bytes_out()
            grew = now - last
            self.background = grew if self.background is None else min(self.background, grew)
            if grew <= 2 * self.background + 1_000_000:
                return now
            last = now
        return last

    # -- one round

    async def round(self, rid: int, n: int, m: int, *, fetch_model: bool = False) -> dict[str, Any]:
        sent0 = await self.settle()
        async with asyncio.timeout(120 + n / 50):
            params = await self._future(self.params, rid)
        g = params.groups  # the round's, as an updater reads it
        summer_ids, updater_ids = self.fleet.identities_for_roles(
            params.seed, p_sum=P_SUM, p_update=1.0, summers=max(SUMMERS, g), updaters=n, groups=g
        )
        summers = [
            SimParticipant(
                i,
                ca_public_key=self.fleet.ca_public_key,
                host="127.0.0.1",
                port=self.brokers[0].port,
                behaviour=Behaviour(send_heartbeat=False),
            )
            for i in summer_ids
        ]
        try:
            for s in summers:
                await s.start()
            async with asyncio.timeout(120):
                sums = await self._future(self.sums, rid)
            frames_file, update_bytes = self._write_updates(rid, params, sums, updater_ids, m)
            model_topic = Topics(FLEET).model_latest("sim") if fetch_model else ""
            # CPU over the round, with its window and the fleet's heartbeats in it (to
            # tell the heartbeats' own share from the round's work).
            rx0 = await self._received()
            jif0, brk0 = cpu_jiffies(), self._brokers_cpu()
            times0, sirq0, procs0 = cpu_times(), softirqs(), all_proc_cpu()
            hb0, cpu0, w0 = self._heartbeats(), proc_cpu(self.coordinator.pid), time.monotonic()
            t0, fetched, model_bytes = await self._publish(
                frames_file, n if fetch_model else 0, model_topic
            )
            frames_file.unlink()
            ingest = await self._until_done(rid, n, m)
            hb1, cpu1, w1 = self._heartbeats(), proc_cpu(self.coordinator.pid), time.monotonic()
            jif1, brk1 = cpu_jiffies(), self._brokers_cpu()
            times1, sirq1, procs1 = cpu_times(), softirqs(), all_proc_cpu()
            rx1 = await self._received()
        finally:
            for s in summers:
                await s.stop()
        info = await asyncio.to_thread(round_record, self.work / "coordinator", rid)
        sent1 = await self.settle()
        self._note_rss()
        entry = round_entry(
            rid,
            n,
            info=info,
            ingest=ingest,
            background=self.background,
            update_bytes=update_bytes,
            first_publish=t0,
            cpu_s=cpu1 - cpu0,
            cpu_window=(w1 - w0, hb1 - hb0),
            broker_bytes_out=sent1 - sent0,
            fetched=fetched,
            model_bytes=model_bytes,
        )
        # What the coordinator's MQTT link took in over the window: the round's messages
        # and whatever heartbeats it still read (none in update and sum2).
        entry["coordinator_mqtt_received_in_cpu_window"] = rx1 - rx0
        # Where the rest of the machine's time went over the same window: each CPU's
        # busy fraction (/proc/stat) and the CPU-s of the mosquittos this bed started.
        entry["cpu_busy_in_cpu_window"] = cpu_busy(jif0, jif1)
        entry["brokers_cpu_s_in_cpu_window"] = round(brk1 - brk0, 3)
        # The busy share by /proc/stat field, the softirqs each CPU ran, and the CPU-s
        # of the processes outside the bed (other jobs, kernel threads such as
        # ksoftirqd/0), to place work on the coordinator's CPU outside its process.
        entry["cpu_busy_split_in_cpu_window"] = cpu_busy_split(times0, times1)
        entry["softirqs_in_cpu_window"] = softirqs_delta(sirq0, sirq1)
        entry["others_cpu_in_cpu_window"] = others_cpu(procs0, procs1, self.pids())
        return entry

    def pids(self) -> set[int]:
        """This process and every child the bed started (the publishers included)."""
        return {os.getpid(), *(c.pid for c in self.sup.children)}

    def affinities(self) -> dict[str, dict[str, int]]:
        """The CPUs each running process of the bed may use, read back from the kernel
        per thread (child name -> CPU list -> threads); "bench" is this process."""
        out = {"bench": affinity(os.getpid()), "publisher": self.publisher_affinity}
        for c in self.sup.children:
            if c.proc.poll() is None:
                out[c.name] = affinity(c.pid)
        return out

    def _brokers_cpu(self) -> float:
        """User + system CPU-s of every mosquitto of the bed so far."""
        return sum(proc_cpu(b.child.pid) for b in self.brokers)

    async def _received(self) -> int:
        return int((await self.get("/status")).get("mqtt", {}).get("received", 0))

    def _write_updates(
        self, rid: int, params: RoundParams, sums: SumDict, updater_ids: list[Any], m: int
    ) -> tuple[Path, int]:
        """Every updater's masked update, chunked, into a frames file for the publisher
        process; the file and the size of one update."""
        n = len(updater_ids)
        g = params.groups
        opened = open_sum_dict(
            sums,
            fleet=FLEET,
            round_id=rid,
            ca_public_key=self.fleet.ca_public_key,
            now=time.time(),
            revocations=None,
            groups=g,
            round_seed=params.seed,
        )
        cfg = MaskConfig(1.0, max(1000, n), 32)
        rng = np.random.default_rng(rid)
        topics = Topics(FLEET)
        frames_file = self.work / f"frames-{rid}.bin"
        update_bytes = 0
        with frames_file.open("wb") as out:
            for ident in updater_ids:
                seeds = [new_seed() for _ in range(g)]  # one per mask group
                delta = rng.uniform(-0.1, 0.1, m).astype(np.float32)
                words = mask_update(delta, 0.5, seeds, cfg)
                sealed = {
                    s.certificate.public_key: seal_seed(
                        seeds[params.group_of(s.certificate.public_key)], s.ephemeral_pk
                    )
                    for s in opened
                }
                raw = encode_message(
                    Update(ident.certificate, sealed, words),
                    fleet=FLEET,
                    round_id=rid,
                    signing_key=ident.signing_key,
                )
                update_bytes = len(raw)
                topic = topics.update(rid, ident.device_id)
                out.write(records(topic, split_payload(raw, CHUNK)))
        return frames_file, update_bytes

    async def _until_done(self, rid: int, n: int, m: int) -> dict[str, Any]:
        """Until round ``rid``'s model is out and its ingest figures are on /status; those."""
        # Generous: 60 s plus 20 MB/s of updates, on a machine shared with others.
        deadline = time.monotonic() + 60 + n * m * 4 / 20e6
        while True:
            status = await self.get("/status")
            ingest = status.get("last_round_ingest") or {}
            if status.get("model_version", 0) >= rid and ingest.get("round_id") == rid:
                break
            self.sup.check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"round {rid} not done by the deadline: phase {status.get('phase')}, "
                    f"{status.get('updates')} of {n} updates in, reassembly "
                    f"{status.get('reassembly')}"
                )
            await asyncio.sleep(0.05)
        return ingest

    async def _publish(
        self, frames_file: Path, fetches: int, model_topic: str
    ) -> tuple[float, int, int]:
        """The updaters: one publisher process (fetches the model first if asked)."""
        result = self.work / "publish.json"
        result.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "maskfl.tools._scale_procs",
            "--publish",
            str(self.brokers[0].port),
            str(frames_file),
            str(result),
            str(fetches),
            model_topic or "-",
        ]
        child = self.sup.start(f"publisher-{frames_file.stem}", argv)
        child.expected_exit = True
        self.publisher_affinity = affinity(child.pid)  # read while it runs
        deadline = time.monotonic() + 3600
        while not result.exists():
            if child.proc.poll() not in (None, 0) or time.monotonic() > deadline:
                raise RuntimeError(f"the publisher failed: {child.log_tail()}")
            await asyncio.sleep(0.01)
        data = json.loads(result.read_text())
        return float(data["t0"]), int(data["fetched"]), int(data["model_bytes"])
