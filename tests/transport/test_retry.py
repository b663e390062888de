"""The one reconnect policy: back-off with equal jitter, the diagnosis of failures, one
log line per change of cause; and two clients on one identity against a real broker."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import socket
import ssl
import time
from pathlib import Path

import pytest

from maskfl.protocol.errors import TransportError
from maskfl.testing.broker import Mosquitto
from maskfl.testing.tls import TestPki
from maskfl.transport import (
    Backoff,
    Cause,
    Diagnosis,
    LinkEvent,
    LinkReport,
    LinkState,
    MqttConfig,
    MqttTransport,
    RefusedError,
    TlsConfig,
    diagnose,
)


def test_backoff_doubles_to_the_cap_with_equal_jitter_and_resets() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(7)]
    for delay, step in zip(delays, (0.5, 1, 2, 4, 4, 4, 4), strict=True):
        assert step / 2 <= delay <= step
    assert backoff.attempts == 7
    backoff.reset()
    assert backoff.next_delay() <= 0.5
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


def test_jitter_spreads_a_fleet_that_lost_the_broker_together() -> None:
    firsts = [Backoff(8.0, 60.0, rng=random.Random(seed)).next_delay() for seed in range(200)]
    assert min(firsts) >= 4.0 and max(firsts) <= 8.0
    assert max(firsts) - min(firsts) > 3.0  # not all at once


def _chained(outer: str, inner: BaseException) -> TransportError:
    error = TransportError(outer)
    error.__cause__ = inner
    return error


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (
            RefusedError(
                "refused: Not authorized (135)",
                packet="PUBACK",
                reason_code=135,
                reason="Not authorized",
            ),
            Cause.NOT_AUTHORIZED,
        ),
        (
            RefusedError(
                "bad login", packet="CONNACK", reason_code=134, reason="Bad user name or password"
            ),
            Cause.BAD_LOGIN,
        ),
        (
            _chained(
                "closed before CONNACK: the broker sent TLS alert 'certificate revoked'",
                ssl.SSLError(1, "x"),
            ),
            Cause.REVOKED,
        ),
        (
            _chained(
                "cannot connect",
                ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"),
            ),
            Cause.OTHER_FLEET,
        ),
        (
            _chained(
                "cannot connect", ssl.SSLCertVerificationError(1, "CERTIFICATE_VERIFY_FAILED")
            ),
            Cause.BROKER_UNTRUSTED,
        ),
        (_chained("cannot connect", ConnectionRefusedError(111, "refused")), Cause.UNREACHABLE),
        (
            _chained("cannot connect", socket.gaierror(-2, "Name or service not known")),
            Cause.UNREACHABLE,
        ),
        (TransportError("broker sent no CONNACK within 5 s"), Cause.UNREACHABLE),
        ("broker sent DISCONNECT: Session taken over", Cause.TAKEN_OVER),
        ("Unspecified error", Cause.LINK_LOST),
    ],
)
def test_diagnose(error: BaseException | str, cause: Cause) -> None:
    found = diagnose(error)
    assert found.cause is cause
    assert found.detail == str(error)
    assert found.advice


def test_the_report_logs_changes_not_attempts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "test.report")
    report = LinkReport(logging.getLogger("test.report"), "mqtt b:1")
    refused = Diagnosis(Cause.NOT_AUTHORIZED, "Not authorized (135)")
    for _ in range(189):
        report.failed(refused, 1.0)
    report.failed(Diagnosis(Cause.UNREACHABLE, "Connection refused"), 2.0)
    report.up()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 2
    assert "reload mosquitto" in warnings[0] and "Not authorized (135)" in warnings[0]
    assert "unreachable" in warnings[1]
    assert infos == [infos[0]] and "connected again after 190 failures" in infos[0]


def test_a_takeover_is_not_reported_as_recovered_until_the_link_settles(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "test.report")
    report = LinkReport(logging.getLogger("test.report"), "mqtt b:1")
    for _ in range(5):
        report.failed(Diagnosis(Cause.TAKEN_OVER, "Unspecified error, again within seconds"))
        report.up()
    report.settled()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "another process uses this client's identity" in lines[0]
    assert "stable again" in lines[1]


@pytest.mark.broker
async def test_two_clients_on_one_identity_back_off_and_say_so_once(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Two agents started on one bundle: mosquitto closes the older link whenever the
    other connects (without a DISCONNECT packet). Each logs the likely cause once and
    reconnects ever more slowly, instead of taking the session back every second."""
    caplog.set_level(logging.INFO, "maskfl.transport")
    config = MqttConfig(
        host=mosquitto.host,
        port=mosquitto.port,
        client_id="pi-003",
        reconnect_min_s=0.05,
        reconnect_max_s=1.0,  # a link counts as stable after 2 s: never, here
    )
    first, second = MqttTransport(config), MqttTransport(config)
    connected: dict[int, list[float]] = {0: [], 1: []}
    causes: list[Cause | None] = []
    done = asyncio.Event()

    def listener(index: int):  # type: ignore[no-untyped-def]
        def on_event(event: LinkEvent) -> None:
            if event.state is LinkState.CONNECTED:
                connected[index].append(time.monotonic())
            elif event.state is LinkState.DISCONNECTED:
                causes.append(event.cause)
            if min(len(c) for c in connected.values()) >= 6:
                done.set()

        return on_event

    first.add_listener(listener(0))
    second.add_listener(listener(1))
    async with asyncio.timeout(30), first, second:
        await done.wait()
    assert Cause.TAKEN_OVER in causes
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.INFO and not r.getMessage().endswith(": closed")
    ]
    taken = [line for line in lines if "another process uses" in line]
    assert 1 <= len(taken) <= 2, lines  # once per client
    # Per client at most: connected, lost (cause unknown yet), connected again, taken over;
    # then nothing more, however often they take the session from each other.
    assert len(lines) <= 8, lines
    assert "another process uses" in lines[-1], lines
    # The back-off kept growing (the 6th connect follows a step of 0.8 s, a wait of at
    # least 0.4 s) instead of restarting at 0.05 s after every successful reconnect.
    for times in connected.values():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[-1] >= 0.4, gaps


@pytest.mark.broker
async def test_a_broker_restarted_twice_in_a_row_is_not_a_takeover(tmp_path: Path) -> None:
    """Short-lived links alone do not mean another process: after a restart the attempts
    in between fail (the broker is down), which a takeover never shows."""
    broker = Mosquitto(tmp_path / "broker").start()
    transport = MqttTransport(
        MqttConfig(
            host=broker.host,
            port=broker.port,
            client_id="c",
            reconnect_min_s=0.05,
            reconnect_max_s=5,
        )
    )
    events: list[LinkEvent] = []
    changed = asyncio.Event()

    def on_event(event: LinkEvent) -> None:
        events.append(event)
        changed.set()

    async def wait_for(check: object) -> None:
        while not check():  # type: ignore[operator]
            changed.clear()
            await changed.wait()

    transport.add_listener(on_event)
    try:
        async with asyncio.timeout(30), transport:
            for _ in range(3):
                broker.stop()
                failed = len([e for e in events if e.cause is Cause.UNREACHABLE])
                await wait_for(
                    lambda f=failed: len([e for e in events if e.cause is Cause.UNREACHABLE]) > f
                )
                ups = len([e for e in events if e.state is LinkState.CONNECTED])
                broker.start()
                await wait_for(
                    lambda u=ups: len([e for e in events if e.state is LinkState.CONNECTED]) > u
                )
    finally:
        broker.stop()
    causes = [e.cause for e in events if e.state is LinkState.DISCONNECTED]
    assert Cause.TAKEN_OVER not in causes, causes
    assert Cause.UNREACHABLE in causes


@pytest.mark.broker
async def test_a_certificate_from_another_fleet_is_named_as_such(tmp_path: Path) -> None:
    """The broker's TLS alert (``unknown ca``) is read even when TLS 1.3 loses it to the
    CONNECT already sent: the diagnosis says the certificate is not accepted."""
    ours, theirs = TestPki(tmp_path / "ours"), TestPki(tmp_path / "theirs", name="other")
    lines = ours.mosquitto_tls_listener(ours.server_cert(), require_certificate=True)
    foreign = theirs.client_cert("dev-1")
    with Mosquitto(tmp_path / "broker", config=lines) as broker:
        tls = TlsConfig(ca_file=ours.ca.cert, cert_file=foreign.cert, key_file=foreign.key)
        for _ in range(3):  # the alert may come in the handshake or after the CONNECT
            transport = MqttTransport(
                MqttConfig(host=broker.host, port=broker.port, client_id="dev-1", tls=tls)
            )
            with pytest.raises(TransportError) as info:
                await transport.connect()
            found = diagnose(info.value)
            assert found.cause is Cause.OTHER_FLEET, info.value
            assert "it belongs to another fleet" in found.advice
            assert "unknown ca" in str(info.value).lower(), info.value


@pytest.mark.broker
async def test_a_tls_client_at_a_port_without_tls_is_told_so(tmp_path: Path) -> None:
    """The agent's TLS config against mosquitto's plain listener (it resets the
    handshake) and against an HTTP server (it answers text): one clear cause, not
    'Connection reset by peer' or 'wrong version number' alone."""
    pki = TestPki(tmp_path / "pki")
    client = pki.client_cert("dev-1")
    tls = TlsConfig(ca_file=pki.ca.cert, cert_file=client.cert, key_file=client.key)

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    http_port = server.sockets[0].getsockname()[1]
    with Mosquitto(tmp_path / "plain") as plain:
        async with server:
            for port in (plain.port, http_port):
                transport = MqttTransport(
                    MqttConfig(host="127.0.0.1", port=port, client_id="dev-1", tls=tls)
                )
                with pytest.raises(TransportError) as info:
                    await transport.connect()
                found = diagnose(info.value)
                assert found.cause is Cause.NOT_MQTT_TLS, (port, info.value)
                assert found.advice.startswith("nothing speaking MQTT over TLS at this address")
                assert "plain or the HTTP port" in found.advice
    # The same TLS config at a real TLS listener with our CA connects: no false alarm.
    lines = pki.mosquitto_tls_listener(pki.server_cert(), require_certificate=True)
    with Mosquitto(tmp_path / "tls", config=lines) as broker:
        transport = MqttTransport(
            MqttConfig(host=broker.host, port=broker.port, client_id="dev-1", tls=tls)
        )
        async with asyncio.timeout(30), transport:
            assert transport.is_connected


def test_a_link_lost_with_an_eof_is_not_a_wrong_port() -> None:
    eof = ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation")
    assert diagnose(eof).cause is Cause.LINK_LOST
    reset = TransportError("cannot connect to MQTT broker h:1: [Errno 104] Connection reset")
    assert diagnose(reset).cause is Cause.LINK_LOST  # only a probed handshake says more
