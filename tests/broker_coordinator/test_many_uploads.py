"""Many large uploads at once reach the coordinator and all count (issue 13, break 1).

300 updaters at M = 1e6 (4 MB updates, 16 chunk frames each) upload at the same
time against the default ``pet.message_memory_max_bytes`` (256 MiB, room for about 55
in memory, fewer as accepted updates' words are kept), through a real mosquitto to a
coordinator process. The frames arrive in the
worst order: the first frame of every update, then every second frame, and so on.
The old reassembler dropped the oldest partial for each new one and accepted 0 of
200 updates; now the uploads beyond memory go to the spool and every one counts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from maskfl.protocol.chunking import split_payload
from maskfl.protocol.crypto import new_seed, seal_seed
from maskfl.protocol.masking import MaskConfig, mask_update
from maskfl.protocol.messages import (
    GlobalModel,
    Receipt,
    SumDict,
    Update,
    decode_message,
    encode_message,
    open_sum_dict,
)
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import Mosquitto, free_port
from maskfl.testing.fleet import SimFleet, coordinator_command, first_round_seed
from maskfl.testing.participants import SimParticipant, start_all, stop_all
from maskfl.transport import MqttConfig, MqttTransport

pytestmark = [pytest.mark.slow, pytest.mark.broker]

N = 300
M = 1_000_000
CHUNK = 256 * 1024
P_SUM = 0.5


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as r:
        data: dict[str, Any] = json.loads(r.read())
        return data


async def test_300_concurrent_4mb_uploads_all_count(tmp_path: Path) -> None:  # noqa: PLR0915 one scenario, set up and checked in line
    fleet = SimFleet(fleet="many")
    initial = np.zeros(M, dtype=np.float32)
    summer_ids, updater_ids = fleet.identities_for_roles(
        first_round_seed(bytes(32), initial), p_sum=P_SUM, p_update=1.0, summers=2, updaters=N
    )
    http_port = free_port()
    with Mosquitto(tmp_path / "broker") as broker:
        config = fleet.write_coordinator(
            tmp_path / "coordinator",
            port=broker.port,
            length=M,
            initial=initial,
            overrides={
                "masking": {"bound": 1.0, "n_max": 1000, "word_bits": 32},
                "pet": {  # message memory and reassembly_* left at their defaults
                    "chunk_size": CHUNK,
                    "max_rounds": 2,
                    "round_pause_s": 600.0,
                    "sum": {"prob": P_SUM, "count_min": 2, "count_max": 2, "time_max_s": 60.0},
                    "update": {
                        "prob": 1.0,
                        "count_min": N,
                        "count_max": N,
                        "time_min_s": 0.0,
                        "time_max_s": 240.0,
                    },
                    "sum2": {"count_min": 2, "count_max": 2, "time_max_s": 120.0},
                },
                "log": {"level": "warning", "format": "text"},
                "http": {"enabled": True, "host": "127.0.0.1", "port": http_port},
            },
        )
        topics = Topics(fleet.fleet)
        summers = [
            SimParticipant(i, ca_public_key=fleet.ca_public_key, host="127.0.0.1", port=broker.port)
            for i in summer_ids
        ]
        observer = MqttTransport(
            MqttConfig(
                host="127.0.0.1",
                port=broker.port,
                client_id="observer",
                max_incoming_payload=64 << 20,
                incoming_queue_size=100_000,
            )
        )
        publisher = MqttTransport(
            MqttConfig(host="127.0.0.1", port=broker.port, client_id="uploads", max_inflight=64)
        )
        await observer.connect()
        await publisher.connect()
        await observer.subscribe(
            [
                f"{topics.prefix}round/+/sums",
                f"{topics.prefix}receipts/+",
                topics.prefix + "model/+/latest",
            ]
        )
        await start_all(summers)
        sums: asyncio.Future[SumDict] = asyncio.get_running_loop().create_future()
        receipts: list[Receipt] = []
        model: asyncio.Future[GlobalModel] = asyncio.get_running_loop().create_future()

        async def observe() -> None:
            async for msg in observer.messages():
                if not msg.payload:
                    continue
                body = decode_message(msg.payload, max_size=64 << 20).body
                if isinstance(body, SumDict) and not sums.done():
                    sums.set_result(body)
                elif isinstance(body, Receipt) and body.message_type is not None:
                    if body.message_type.name == "UPDATE":
                        receipts.append(body)
                elif isinstance(body, GlobalModel) and body.version == 1 and not model.done():
                    model.set_result(body)

        watcher = asyncio.create_task(observe())
        log = (tmp_path / "coordinator.log").open("wb")
        coord = await asyncio.create_subprocess_exec(
            *coordinator_command(config),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(60):
                sum_dict = await sums
            opened = open_sum_dict(
                sum_dict,
                fleet=fleet.fleet,
                round_id=1,
                ca_public_key=fleet.ca_public_key,
                now=time.time(),
                revocations=None,
            )
            cfg = MaskConfig(1.0, 1000, 32)
            rng = np.random.default_rng(0)
            uploads = []
            for ident in updater_ids:
                seed = new_seed()
                words = mask_update(rng.uniform(-0.1, 0.1, M).astype(np.float32), 0.5, seed, cfg)
                sealed = {s.certificate.public_key: seal_seed(seed, s.ephemeral_pk) for s in opened}
                raw = encode_message(
                    Update(ident.certificate, sealed, words),
                    fleet=fleet.fleet,
                    round_id=1,
                    signing_key=ident.signing_key,
                )
                uploads.append((topics.update(1, ident.device_id), split_payload(raw, CHUNK)))
                update_size = len(raw)
            count = len(uploads[0][1])
            assert count >= 16 and all(len(f) == count for _, f in uploads)
            window = asyncio.Semaphore(64)

            async def one(topic: str, frame: bytes) -> None:
                try:
                    await publisher.publish(topic, frame, qos=1)
                finally:
                    window.release()

            tasks = []
            for index in range(count):  # every upload in flight at once
                for topic, frames in uploads:
                    await window.acquire()
                    tasks.append(asyncio.create_task(one(topic, frames[index])))
            await asyncio.gather(*tasks)
            del uploads, tasks
            async with asyncio.timeout(240):
                got = await model
            assert got.version == 1
            status = _status(http_port)
        finally:
            coord.terminate()
            async with asyncio.timeout(30):
                await coord.wait()
            log.close()
            watcher.cancel()
            await stop_all(summers)
            await publisher.disconnect()
            await observer.disconnect()
    assert coord.returncode == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    accepted = [r for r in receipts if r.accepted]
    assert len(accepted) == N, [str(r.reason) for r in receipts if not r.accepted][:5]
    reassembly = status["reassembly"]
    assert reassembly["evicted"] == 0 and reassembly["refused"] == 0, reassembly
    assert reassembly["spooled_peak"] > 0  # the uploads did not fit in memory
    memory = status["message_memory"]  # and memory held at most one update beyond the bound
    assert 0 < memory["peak"] <= memory["bound"] + update_size, memory
