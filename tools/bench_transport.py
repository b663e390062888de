"""``maskfl-bench transport``: MqttTransport throughput and large-payload latency.

One publisher and one subscriber ``MqttTransport`` in this process, through a
mosquitto (a temporary one on a free loopback port unless ``--port`` is given,
configured with ``max_queued_messages 0`` as the deployment is). Reports
messages per second for small QoS 1 messages (publisher side: all PUBACKs in;
end to end: all received) and the time from publish to receipt for large
payloads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from maskfl.tools._supervise import Supervisor
from maskfl.transport import MqttConfig, MqttTransport


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("transport", help="MQTT adapter throughput through mosquitto")
    parser.add_argument("--messages", type=int, default=20_000, help="small messages to send")
    parser.add_argument("--size", type=int, default=1024, help="bytes per small message")
    parser.add_argument("--window", type=int, default=200, help="publishes awaited at once")
    parser.add_argument("--large-mb", type=float, default=4.0, help="large payload in MiB")
    parser.add_argument("--large-count", type=int, default=5)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="use this broker instead of a temporary one")
    parser.add_argument("--json", type=Path, help="write the JSON here instead of stdout")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.port is not None:
        return asyncio.run(_measure(args, args.host, args.port))
    with _temporary_mosquitto() as port:
        return asyncio.run(_measure(args, "127.0.0.1", port))


async def _measure(args: argparse.Namespace, host: str, port: int) -> dict[str, Any]:
    large = int(args.large_mb * 1024 * 1024)
    limit = large + 1024
    pub_cfg = MqttConfig(host=host, port=port, client_id="bench-pub", max_incoming_payload=limit)
    sub_cfg = MqttConfig(
        host=host,
        port=port,
        client_id="bench-sub",
        incoming_queue_size=10_000,
        max_incoming_payload=limit,
    )
    async with MqttTransport(pub_cfg) as pub, MqttTransport(sub_cfg) as sub:
        await sub.subscribe("bench/#")
        payload = bytes(args.size)
        received = 0
        done = asyncio.Event()

        async def consume(expected: int) -> None:
            nonlocal received
            while received < expected:
                await sub.receive()
                received += 1
            done.set()

        consumer = asyncio.create_task(consume(args.messages))
        start = time.perf_counter()
        for first in range(0, args.messages, args.window):
            count = min(args.window, args.messages - first)
            await asyncio.gather(*(pub.publish("bench/small", payload) for _ in range(count)))
        acked = time.perf_counter() - start
        async with asyncio.timeout(120):
            await done.wait()
        end_to_end = time.perf_counter() - start
        await consumer

        latencies = []
        blob = bytes(large)
        for _ in range(args.large_count):
            t0 = time.perf_counter()
            await pub.publish("bench/large", blob)
            message = await sub.receive()
            latencies.append(time.perf_counter() - t0)
            assert len(message.payload) == large
    return {
        "messages": args.messages,
        "size_bytes": args.size,
        "qos": 1,
        "window": args.window,
        "publish_acked_msgs_per_s": round(args.messages / acked),
        "end_to_end_msgs_per_s": round(args.messages / end_to_end),
        "received": received,
        "large_payload_bytes": large,
        "large_publish_to_receive_s": [round(x, 4) for x in latencies],
        "subscriber_backpressure_pauses": sub.stats.backpressure_pauses,
    }


@contextlib.contextmanager
def _temporary_mosquitto() -> Iterator[int]:
    with tempfile.TemporaryDirectory() as tmp, Supervisor(Path(tmp)) as sup:
        yield sup.start_plain_broker(Path(tmp), limit_s=10)
