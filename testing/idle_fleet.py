"""Many idle, heartbeating devices in one process: raw MQTT 5 over non-blocking sockets.

``maskfl-bench scale`` needs 10^4-10^5 connected devices on a 2-core machine, so a
device here is one socket and a few integers, not a paho client: it sends CONNECT
(clean start, keepalive, an empty last will on ``status/<device>`` like the agent),
SUBSCRIBEs at QoS 0 to what an agent subscribes to for good (plus
``model/+/latest`` with ``--models``, the behaviour before devices fetched models
on demand), then a QoS 0 PUBLISH of a heartbeat-sized payload on
``status/<device>`` every ``--interval`` seconds, spread evenly over the interval.
Everything received is read and discarded (counted), so the broker is never held
up by a slow reader. One epoll loop, no threads; connects go out in batches that
wait for their CONNACKs, so the broker's listen backlog never overflows.

Each process writes its counters as JSON to ``--status`` once a second and stops on
SIGTERM. Sockets are bound to distinct loopback source addresses (127.x.y.z), so
ephemeral ports never run out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import socket
import time
from pathlib import Path

_BATCH = 250
_TICK_S = 0.02
# The reference agent's signed HEARTBEAT is 378 bytes (wire-format vectors); the
# coordinator reads only the topic, so the size is what matters here.
HEARTBEAT_BYTES = 378


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, keepalive_s: int, will_topic: str) -> bytes:
    # Clean start (0x02), will flag (0x04), will QoS 1 (0x08): the agent's empty will.
    variable = _str("MQTT") + bytes([5, 0x02 | 0x04 | 0x08]) + keepalive_s.to_bytes(2, "big")
    variable += _varint(0)  # no properties
    payload = _str(client_id) + _varint(0) + _str(will_topic) + _str(b"")
    return _packet(0x10, variable + payload)


def subscribe_packet(packet_id: int, filters: list[str]) -> bytes:
    body = packet_id.to_bytes(2, "big") + _varint(0)
    for f in filters:
        body += _str(f) + bytes([0])  # QoS 0
    return _packet(0x82, body)


def publish_packet(topic: str, payload: bytes) -> bytes:
    return _packet(0x30, _str(topic) + _varint(0) + payload)


def agent_filters(fleet: str, device: str, models: bool) -> list[str]:
    p = f"maskfl/v1/{fleet}/"
    out = [
        f"{p}round",
        f"{p}revocations",
        f"{p}round/+/sums",
        f"{p}round/+/seeds/{device}",
        f"{p}receipts/{device}",
        f"{p}model/+/graph",
    ]
    return [*out, f"{p}model/+/latest"] if models else out


def source_address(index: int) -> str:
    """127.1.0.1, 127.1.0.2, ...: 250 devices per address, far below the port range."""
    n = index // 250
    return f"127.{1 + n // 65536}.{(n // 256) % 256}.{1 + n % 250}"


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ep = select.epoll()
        self.socks: dict[int, socket.socket] = {}
        self.devices: dict[int, str] = {}
        self.acked: set[int] = set()
        self.counts = {
            "connected": 0,
            "refused": 0,
            "failed": 0,
            "closed": 0,
            "heartbeats": 0,
            "heartbeats_skipped": 0,
            "bytes_in": 0,
            "bytes_out": 0,
        }
        self.stop = False
        self.payload = os.urandom(HEARTBEAT_BYTES)
        self.packets: dict[int, bytes] = {}
        self.wheel: dict[int, list[int]] = {}
        self.slot = 0

    def _open(self, index: int) -> None:
        a = self.args
        device = f"{a.prefix}{index:06d}"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
        s.bind((source_address(index), 0))
        s.setblocking(False)
        try:
            s.connect((a.host, a.port))
        except BlockingIOError:
            pass
        except OSError:
            self.counts["failed"] += 1
            s.close()
            return
        fd = s.fileno()
        self.socks[fd] = s
        self.devices[fd] = device
        self.ep.register(fd, select.EPOLLOUT | select.EPOLLIN)

    def _send(self, fd: int, data: bytes) -> bool:
        try:
            sent = self.socks[fd].send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._close(fd)
            return False
        self.counts["bytes_out"] += sent
        return sent == len(data)

    def _close(self, fd: int) -> None:
        s = self.socks.pop(fd, None)
        if s is None:
            return
        self.devices.pop(fd, None)
        self.packets.pop(fd, None)
        self.acked.discard(fd)
        self.counts["closed"] += 1
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        s.close()

    def _on_event(self, fd: int, ev: int) -> None:
        a = self.args
        if ev & select.EPOLLOUT:
            self.ep.modify(fd, select.EPOLLIN)
            err = self.socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.counts["failed"] += 1
                self._close(fd)
                return
            device = self.devices[fd]
            topic = f"maskfl/v1/{a.fleet}/status/{device}"
            self._send(fd, connect_packet(device, a.keepalive, topic))
            return
        if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            try:
                data = self.socks[fd].recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(fd)
                return
            if not data:
                self._close(fd)
                return
            self.counts["bytes_in"] += len(data)
            if fd not in self.acked:
                # The first bytes are the CONNACK: 0x20, length, flags, reason code.
                if data[0] != 0x20 or len(data) < 4 or data[3] != 0:
                    self.counts["refused"] += 1
                    self._close(fd)
                    return
                self.acked.add(fd)
                self.counts["connected"] += 1
                device = self.devices[fd]
                self._send(fd, subscribe_packet(1, agent_filters(a.fleet, device, a.models)))
                # Like the agent: a heartbeat at once, then every interval (the first
                # repeat spread over the interval, so connect bursts do not stay bursts).
                packet = publish_packet(f"maskfl/v1/{a.fleet}/status/{device}", self.payload)
                self.packets[fd] = packet
                if self._send(fd, packet):
                    self.counts["heartbeats"] += 1
                self._schedule(fd, time.monotonic() + a.interval * (0.5 + random.random()))

    def _poll(self, timeout: float) -> None:
        for fd, ev in self.ep.poll(timeout, 4096):
            if fd in self.socks:
                self._on_event(fd, ev)

    def _write_status(self) -> None:
        tmp = Path(f"{self.args.status}.tmp")
        tmp.write_text(json.dumps({**self.counts, "open": len(self.socks), "pid": os.getpid()}))
        tmp.replace(self.args.status)

    def _schedule(self, fd: int, at: float) -> None:
        self.wheel.setdefault(int(at / _TICK_S), []).append(fd)

    def _beat(self, now: float) -> None:
        """Send every heartbeat that is due and schedule each device's next one."""
        slot = int(now / _TICK_S)
        while self.slot < slot:
            self.slot += 1
            for fd in self.wheel.pop(self.slot, ()):
                packet = self.packets.get(fd)
                if packet is None or fd not in self.socks:
                    continue
                if self._send(fd, packet):
                    self.counts["heartbeats"] += 1
                else:
                    self.counts["heartbeats_skipped"] += 1
                self._schedule(fd, now + self.args.interval)

    def run(self) -> None:
        a = self.args
        index = a.first
        end = a.first + a.count
        next_status = 0.0
        batch_deadline = 0.0
        self.slot = int(time.monotonic() / _TICK_S)
        while not self.stop:
            now = time.monotonic()
            done = self.counts["connected"] + self.counts["failed"] + self.counts["refused"]
            if index < end and (done >= index - a.first or now > batch_deadline):
                # The next batch once the last one has its CONNACKs (or after 10 s).
                batch_end = min(end, index + _BATCH)
                for i in range(index, batch_end):
                    self._open(i)
                index = batch_end
                batch_deadline = now + 10
            self._beat(now)
            if now >= next_status:
                self._write_status()
                next_status = now + 1
            self._poll(_TICK_S)
        self._write_status()
        for fd in list(self.socks):
            self._close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fleet", required=True)
    parser.add_argument("--prefix", default="idle-")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--keepalive", type=int, default=120)
    parser.add_argument("--models", action="store_true", help="also subscribe to model/+/latest")
    parser.add_argument("--status", type=Path, required=True)
    args = parser.parse_args()
    fleet = Fleet(args)

    def stop(*_: object) -> None:
        fleet.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    fleet.run()


if __name__ == "__main__":
    main()
