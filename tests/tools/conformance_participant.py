"""A protocol-level participant for ``maskfl-conformance`` tests, correct or deliberately wrong.

``python -m tests.tools.conformance_participant [--fault weight-word|ticket|one-seed]`` reads
the bundle named by ``MASKFL_BUNDLE`` (as the conformance bench passes it) and takes
part in rounds with :class:`maskfl.testing.participants.SimParticipant` until SIGTERM.

- ``--fault weight-word``: the weight word is ``round(a·S_w)``, without the offset
  ``S_w`` (docs/protocol.md §7.3);
- ``--fault ticket``: the ticket reads the BLAKE2b digest big-endian instead of
  little-endian (docs/protocol.md §4.1);
- ``--fault one-seed``: with g > 1, the same seed masks every group (docs/protocol.md §4.4).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import sys
from pathlib import Path

import numpy as np

from maskfl.agent.config import load_config
from maskfl.agent.daemon import build_mqtt_config
from maskfl.agent.identity import load_identity
from maskfl.protocol.masking import Words
from maskfl.protocol.messages import RoundParams
from maskfl.protocol.sortition import Task, threshold
from maskfl.testing.participants import Behaviour, SimParticipant


def _big_endian_task(params: RoundParams, public_key: bytes) -> Task:
    def ticket(task: str) -> int:
        h = hashlib.blake2b(
            params.seed + task.encode() + public_key, digest_size=8, person=b"maskfl/ticket/v1"
        )
        return int.from_bytes(h.digest(), "big")

    if ticket("sum") < threshold(params.p_sum):
        return Task.SUM
    if ticket("update") < threshold(params.p_update):
        return Task.UPDATE
    return Task.NONE


def _drop_weight_offset(words: Words, params: RoundParams) -> None:
    cfg = params.mask
    m = params.vector_length  # the weight word follows the M elements
    words[m] = cfg.dtype((int(words[m]) - cfg.weight_scale) % cfg.modulus)


def _delta(_round_id: int, m: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(5)
    return rng.uniform(-0.01, 0.01, m).astype(np.float32), 0.6


async def run(fault: str | None) -> None:
    bundle = Path(os.environ["MASKFL_BUNDLE"])
    config = load_config(bundle / "agent.toml")
    ident = load_identity(config.device)
    behaviour = Behaviour(
        delta=_delta,
        select=_big_endian_task if fault == "ticket" else None,
        tamper_update=_drop_weight_offset if fault == "weight-word" else None,
        one_seed_for_all_groups=fault == "one-seed",
    )
    participant = SimParticipant(
        ident.identity,
        ca_public_key=ident.ca_public_key,
        host=config.broker.host,
        port=config.broker.port,
        behaviour=behaviour,
        mqtt=build_mqtt_config(config, b""),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await participant.start()
    print(f"participant {participant.device} connected (fault: {fault})", flush=True)
    await stop.wait()
    await participant.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fault", choices=["weight-word", "ticket", "one-seed"])
    args = parser.parse_args(argv)
    asyncio.run(run(args.fault))
    return 0


if __name__ == "__main__":
    sys.exit(main())
