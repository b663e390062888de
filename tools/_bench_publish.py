"""The frames of a round, published from a separate process, and the bare subscriber
the coordinator's ingest is compared with (``maskfl-bench coordinator``; ``scale``
publishes the same frames file).

A frames file holds length-prefixed ``(topic, frame)`` records (:func:`records`). The
publisher and the subscriber are processes of their own (``python -m`` this module), so
the bench's own event loop never limits their speed; they signal through files.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

from maskfl.tools._bench_probe import cpu_seconds
from maskfl.tools._supervise import Supervisor
from maskfl.transport import MqttConfig, MqttTransport


def records(topic: str, frames: list[bytes]) -> bytes:
    """``frames`` of one message on ``topic`` as frames-file records."""
    t = topic.encode()
    return b"".join(struct.pack("<HI", len(t), len(f)) + t + f for f in frames)


async def publish_all(publisher: MqttTransport, frames: list[tuple[str, list[bytes]]]) -> None:
    """Publish every frame, keeping many PUBACKs outstanding (like many devices at once)."""
    window = asyncio.Semaphore(64)
    pending: set[asyncio.Task[None]] = set()

    async def one(topic: str, frame: bytes) -> None:
        try:
            await publisher.publish(topic, frame, qos=1)
        finally:
            window.release()

    for topic, fs in frames:
        for frame in fs:
            await window.acquire()
            task = asyncio.create_task(one(topic, frame))
            pending.add(task)
            task.add_done_callback(pending.discard)
    if pending:
        await asyncio.gather(*pending)


def _exists(path: Path | str) -> bool:
    """A file another process writes to signal us (polled; cheap, never blocks long)."""
    return os.path.exists(path)


def _touch(path: Path) -> None:
    path.write_text("")


def write_frames(path: Path, frames: list[tuple[str, list[bytes]]]) -> None:
    """Length-prefixed (topic, frame) records for the publisher process."""
    with path.open("wb") as f:
        for topic, fs in frames:
            f.write(records(topic, fs))


def read_frames(path: Path) -> list[tuple[str, bytes]]:
    data = path.read_bytes()
    out = []
    pos = 0
    while pos < len(data):
        tlen, flen = struct.unpack_from("<HI", data, pos)
        pos += 6
        topic = data[pos : pos + tlen].decode()
        pos += tlen
        out.append((topic, data[pos : pos + flen]))
        pos += flen
    return out


async def publish_in_child(
    sup: Supervisor, work: Path, port: int, frames_file: Path, name: str
) -> tuple[float, float]:
    """Publish every frame from a fresh process; returns (first publish, last PUBACK) times."""
    result = work / f"{name}-publish.json"
    go = work / f"{name}-publish.go"
    child = sup.start(
        f"publisher-{name}",
        [
            sys.executable,
            "-m",
            "maskfl.tools._bench_publish",
            "--publish",
            str(port),
            str(frames_file),
            "sink" if name == "baseline" else "",
            str(result),
        ],
    )
    child.expected_exit = True  # it exits when done; a failure shows as a missing result
    ready = f"{result}.ready"
    deadline = time.monotonic() + 60
    while not _exists(ready):
        sup.check()
        if time.monotonic() > deadline or child.proc.poll() is not None:
            raise TimeoutError(f"the publisher did not start: {child.log_tail()}")
        await asyncio.sleep(0.02)
    _touch(go)
    while not _exists(result):
        sup.check()
        if time.monotonic() > deadline + 600 or (
            child.proc.poll() not in (None, 0) and not _exists(result)
        ):
            raise TimeoutError(f"the publisher did not finish: {child.log_tail()}")
        await asyncio.sleep(0.005)
    data = json.loads(result.read_text())
    return float(data["t0"]), float(data["t1"])


async def _publisher(port: int, frames_file: Path, rename: str, result: Path) -> None:
    """The publisher process: load the frames, connect, wait for go, publish all."""
    records = read_frames(frames_file)
    if rename:
        records = [(t.replace("maskfl/v1/", "bench/sink/", 1), f) for t, f in records]
    t = MqttTransport(
        MqttConfig(host="127.0.0.1", port=port, client_id=f"bench-pub-{rename}", max_inflight=64)
    )
    await t.connect()
    _touch(Path(f"{result}.ready"))
    go = str(result).replace(".json", ".go")
    while not _exists(go):  # noqa: ASYNC110 - a file from another process
        await asyncio.sleep(0.001)
    t0 = time.time()
    by_topic: dict[str, list[bytes]] = {}
    for topic, frame in records:
        by_topic.setdefault(topic, []).append(frame)
    await publish_all(t, list(by_topic.items()))
    t1 = time.time()
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps({"t0": t0, "t1": t1}))
    tmp.replace(result)
    await t.disconnect()


async def baseline(
    frames_file: Path,
    *,
    port: int,
    total_frames: int,
    sup: Supervisor,
    work: Path,
) -> dict[str, Any]:
    result = work / "sink.json"
    sink = sup.start(
        "sink",
        [
            sys.executable,
            "-m",
            "maskfl.tools._bench_publish",
            "--sink",
            str(port),
            str(total_frames),
            str(result),
        ],
    )
    ready = work / "sink.json.ready"
    deadline = time.monotonic() + 30
    while not _exists(ready):
        sup.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the bare subscriber did not start")
        await asyncio.sleep(0.02)
    cpu0 = cpu_seconds(sink.pid)
    t0, _ = await publish_in_child(sup, work, port, frames_file, "baseline")
    deadline = time.monotonic() + 600
    while not _exists(result):
        sup.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the bare subscriber did not receive everything")
        await asyncio.sleep(0.005)
    data = json.loads(result.read_text())
    cpu = cpu_seconds(sink.pid) - cpu0
    seconds = data["last"] - t0
    consumer = data["last"] - data["first"]
    mb = data["bytes"] / 1e6
    return {
        "s": round(seconds, 4),
        "messages_per_s": round(data["count"] / seconds, 1),
        "mb_per_s": round(mb / seconds, 2),
        "cpu_s": round(cpu, 3),
        "consumer_s": round(consumer, 4),
        "consumer_mb_per_s": round(mb / consumer, 2) if consumer > 0 else None,
    }


async def _sink(port: int, expected: int, result: Path) -> None:
    """The bare subscriber: receive ``expected`` messages, ack them, write the time."""
    t = MqttTransport(
        MqttConfig(
            host="127.0.0.1",
            port=port,
            client_id="bench-sink",
            max_incoming_payload=64 << 20,
            incoming_queue_size=256,
            manual_ack=True,
            clean_start=False,
            session_expiry_s=600,
            receive_maximum=65535,
        )
    )
    await t.connect()
    await t.subscribe("bench/sink/#", qos=1)
    _touch(Path(f"{result}.ready"))
    count = 0
    size = 0
    first = 0.0
    async for msg in t.messages():
        if not count:
            first = time.time()
        count += 1
        size += len(msg.payload)
        t.ack(msg)
        if count >= expected:
            break
    tmp = result.with_suffix(".tmp")
    last = time.time()
    tmp.write_text(json.dumps({"count": count, "bytes": size, "first": first, "last": last}))
    tmp.replace(result)
    await asyncio.sleep(2.0)  # stay up while the bench reads our CPU time
    await t.disconnect()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--sink":
        asyncio.run(_sink(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])))
    elif len(sys.argv) == 6 and sys.argv[1] == "--publish":
        asyncio.run(_publisher(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5])))
