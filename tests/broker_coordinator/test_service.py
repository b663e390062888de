"""Operations: the HTTP endpoints, the CLI on the database, and revocation reload."""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from maskfl.broker_coordinator.cli import main
from maskfl.protocol.identity import RevocationList
from maskfl.protocol.topics import Topics
from maskfl.testing.broker import Mosquitto, free_port
from maskfl.testing.participants import SimParticipant, start_all, stop_all, wait_for
from maskfl.transport import MqttConfig, MqttTransport
from tests.broker_coordinator.support import make_setup, running_coordinator, trained
from tests.support.harness import LogWatch

pytestmark = [pytest.mark.broker, pytest.mark.timeout(90)]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_http_endpoints_and_cli(  # noqa: PLR0915 every endpoint and CLI command against one coordinator
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=2,
        updaters=3,
        extra={
            "http": {"enabled": True, "host": "127.0.0.1", "port": port},
            "model": {"graph_file": "graph.tflite"},
        },
        pet={"max_rounds": 2, "round_pause_s": 30.0},
    )
    graph = b"TFL3" + bytes(range(256)) * 10
    (setup.config_path.parent / "graph.tflite").write_bytes(graph)
    ca = setup.fleet.ca_public_key
    parts = [
        SimParticipant(i, ca_public_key=ca, host=mosquitto.host, port=mosquitto.port)
        for i in setup.summers + setup.updaters
    ]
    await start_all(parts)
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            await wait_for(lambda: all(trained(p) for p in parts), 60, "the global model")
            async with asyncio.timeout(10):
                await coordinator.started.wait()
            runner = coordinator.runner
            assert runner is not None
            await wait_for(lambda: runner.rounds_completed == 1, 10, "the round's end")
            health = await asyncio.to_thread(_get, port, "/healthz")
            ready = await asyncio.to_thread(_get, port, "/readyz")
            metrics = await asyncio.to_thread(_get, port, "/metrics")
            status = await asyncio.to_thread(_get, port, "/status")
            missing = await asyncio.to_thread(_get, port, "/nope")
            async with MqttTransport(
                MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="graph")
            ) as watcher:
                await watcher.subscribe(Topics(setup.fleet.fleet).model_graph("sim"))
                async with asyncio.timeout(10):
                    retained = await watcher.receive()
            assert retained.retain and retained.payload == graph
    finally:
        await stop_all(parts)
    assert health == (200, "ok\n") and ready[0] == 200 and missing[0] == 404
    assert trained(parts[0])[0].graph_digest == hashlib.sha256(graph).digest()
    assert parts[0].models[0].version == 0  # the initial weights, signed, state it too
    assert parts[0].models[0].graph_digest == hashlib.sha256(graph).digest()
    text = metrics[1]
    assert (
        'maskfl_coordinator_messages_total{reason="",result="accepted",type="update"} 3.0' in text
    )
    assert 'maskfl_coordinator_rounds_total{outcome="completed"} 1.0' in text
    assert "maskfl_coordinator_aggregation_seconds_bucket" in text
    data = json.loads(status[1])
    assert data["model_version"] == 1 and data["rounds_completed"] == 1
    # The CLI reads the same database.
    config = str(setup.config_path)
    assert await asyncio.to_thread(main, ["status", "--config", config, "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["model"]["version"] == 1
    assert state["rounds"][-1]["outcome"] == "completed"
    assert state["rounds"][-1]["groups"] == 1  # g, read from the round's signed parameters
    assert await asyncio.to_thread(main, ["status", "--config", config]) == 0
    assert f"round {state['rounds'][-1]['round_id']} (g = 1): completed" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["models", "list", "--config", config, "--json"]) == 0
    versions = [m["version"] for m in json.loads(capsys.readouterr().out)]
    assert versions == [0, 1]
    out = tmp_path / "model.npy"
    assert (
        await asyncio.to_thread(main, ["models", "export", "--config", config, "--out", str(out)])
        == 0
    )
    np.testing.assert_array_equal(np.load(out), trained(parts[0])[0].weights)
    argv = ["models", "export", "--config", config, "--version", "7", "--out", str(out)]
    assert await asyncio.to_thread(main, argv) == 2


async def test_http_answers_while_the_broker_is_down(tmp_path: Path) -> None:
    """/healthz is the process, /readyz the broker link: a down broker is not a dead process."""
    port = free_port()
    broker = Mosquitto(tmp_path / "broker")  # not started yet
    setup = make_setup(
        tmp_path,
        broker.port,
        summers=1,
        updaters=1,
        extra={"http": {"enabled": True, "host": "127.0.0.1", "port": port}},
    )
    with LogWatch() as logs:
        try:
            async with running_coordinator(setup.config_path) as coordinator:

                async def get(path: str) -> tuple[int, str]:
                    try:
                        return await asyncio.to_thread(_get, port, path)
                    except OSError:  # not listening
                        return 0, ""

                # The HTTP server starts, the database opens, the broker link fails.
                await logs.until("the broker is unreachable")
                assert await get("/readyz") == (503, "broker link down\n")
                assert await get("/healthz") == (200, "ok\n")
                assert (await get("/metrics"))[0] == 200
                assert not coordinator.started.is_set()
                broker.start()
                async with asyncio.timeout(30):
                    await coordinator.started.wait()  # connected, serving
                assert await get("/readyz") == (200, "ready\n")
        finally:
            broker.stop()


async def test_revocation_list_is_reloaded_and_republished(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    setup = make_setup(
        tmp_path,
        mosquitto.port,
        summers=3,
        updaters=2,
        pet={"sum": {"count_min": 2, "count_max": 3, "time_min_s": 1.0}, "sum2": {"count_min": 2}},
        extra={"fleet": {"revocations_file": "revoked.bin", "revocations_poll_s": 0.1}},
    )
    revoked = setup.summers[2]
    ca = setup.fleet.ca_public_key
    parts = [
        SimParticipant(i, ca_public_key=ca, host=mosquitto.host, port=mosquitto.port)
        for i in setup.summers + setup.updaters
    ]
    watcher = MqttTransport(MqttConfig(host=mosquitto.host, port=mosquitto.port, client_id="w"))
    try:
        async with running_coordinator(setup.config_path) as coordinator:
            async with asyncio.timeout(10):
                await coordinator.started.wait()
            setup.fleet.revocations(
                setup.config_path.parent / "revoked.bin", [revoked.certificate.serial], 1
            )
            assert coordinator.services is not None
            enrollment = coordinator.services.enrollment
            await wait_for(lambda: enrollment.revocations is not None, 10, "the reload")
            await start_all(parts)
            await wait_for(lambda: all(trained(p) for p in parts[:2] + parts[3:]), 60, "model")
            await watcher.connect()
            await watcher.subscribe(Topics(setup.fleet.fleet).revocations)
            async with asyncio.timeout(10):
                retained = await watcher.receive()
        rl = RevocationList.from_bytes(retained.payload)
        assert rl.serials == (revoked.certificate.serial,)
        victim = parts[2]
        assert [str(r.reason) for r in victim.receipts] == ["revoked"]
        assert dict(trained(parts[0])[0].metrics)["summers"] == 2
    finally:
        await stop_all(parts)
        await watcher.disconnect()
