"""The demo's agents: the real agent daemon, plus a local log of each plain update.

``python -m maskfl.tools.demo_agent --config agent.toml`` runs exactly what
``maskfl-agent run`` runs (:func:`maskfl.agent.daemon.run_daemon`), with one addition
for the demo's privacy check: the learner also writes the plain delta and sample
count of every local round to the device's own state folder
(``<state>/plain-updates/round-<r>.npz``). That file never leaves the device; the
demo reads it afterwards to compare the unmasked aggregate with the plain weighted
mean of the deltas. A production agent keeps no such log.

:class:`InProcessFleet` runs many agents as asyncio tasks in one process (``maskfl-demo
--in-process``): each is the daemon's :class:`~maskfl.agent.daemon.Agent` with its own
identity, journal, MQTT connection and data share; they share one TFLite interpreter
per model, whose lock serialises their local rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt

from maskfl.agent.config import AgentConfig, TrainingSection, load_config
from maskfl.agent.daemon import Agent, run_daemon
from maskfl.agent.datasources import load_dataset
from maskfl.agent.identity import load_identity
from maskfl.agent.learning import (
    Learner,
    LiteRTLearner,
    Split,
    TrainResult,
    holdout_split,
    local_round,
)
from maskfl.agent.state import Journal
from maskfl.agent.training import LocalTrainer
from maskfl.protocol.errors import ConfigError, MaskflError
from maskfl.transport import setup_logging

__all__ = ["InProcessFleet", "RecordingLearner", "SharedTrainerLearner", "main", "plain_log_dir"]

log = logging.getLogger("maskfl.demo.agent")

PLAIN_LOG = "plain-updates"


def plain_log_dir(config: AgentConfig) -> Path:
    return config.state.dir / PLAIN_LOG


class RecordingLearner:
    """Wraps a :class:`Learner`; writes each plain training result to a local file."""

    def __init__(self, inner: Learner, directory: Path) -> None:
        self.inner = inner
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    # The rest of the Learner protocol, forwarded: the wrapper changes nothing but the log.

    def add_graph(self, model_id: str, tflite: bytes) -> None:
        self.inner.add_graph(model_id, tflite)

    def set_graph_digest(self, model_id: str, graph_digest: bytes | None) -> None:
        self.inner.set_graph_digest(model_id, graph_digest)

    def local_weights(self, model_id: str) -> npt.NDArray[np.float32] | None:
        return self.inner.local_weights(model_id)

    async def train(
        self,
        model_id: str,
        global_weights: npt.NDArray[np.float32],
        *,
        round_id: int,
        max_eval_examples: int = 0,
    ) -> TrainResult:
        result = await self.inner.train(
            model_id, global_weights, round_id=round_id, max_eval_examples=max_eval_examples
        )
        await asyncio.to_thread(self._write, round_id, result)
        return result

    def _write(self, round_id: int, result: TrainResult) -> None:
        path = self.directory / f"round-{round_id}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, delta=result.delta, num_samples=np.int64(result.num_samples))
        os.replace(tmp, path)


class SharedTrainerLearner:
    """One device's data with a TFLite interpreter shared by all in-process agents."""

    def __init__(self, trainer: LocalTrainer, split: Split, training: TrainingSection) -> None:
        self.trainer = trainer
        self.split = split
        self.training = training

    # One shared interpreter of a shipped model: no local files, no received graphs.

    def local_weights(self, model_id: str) -> npt.NDArray[np.float32] | None:
        del model_id
        return None

    def add_graph(self, model_id: str, tflite: bytes) -> None:
        del model_id, tflite

    def set_graph_digest(self, model_id: str, graph_digest: bytes | None) -> None:
        del model_id, graph_digest

    async def train(
        self,
        model_id: str,
        global_weights: npt.NDArray[np.float32],
        *,
        round_id: int,
        max_eval_examples: int = 0,
    ) -> TrainResult:
        del model_id
        return await asyncio.to_thread(
            partial(
                local_round,
                self.trainer,
                self.split,
                global_weights,
                self.training,
                round_id=round_id,
                max_eval_examples=max_eval_examples,
            )
        )


class InProcessFleet:
    """Many agents as asyncio tasks in this process (see the module docstring)."""

    def __init__(self, config_paths: Sequence[Path], model: str) -> None:
        self.config_paths = list(config_paths)
        self.model = model
        self.agents: list[Agent] = []
        self._tasks: list[asyncio.Task[int]] = []
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        trainer = await asyncio.to_thread(LocalTrainer.shipped, self.model, num_threads=1)
        for path in self.config_paths:
            config = load_config(path)
            identity = load_identity(config.device)
            data = await asyncio.to_thread(load_dataset, config.data.source, config.data.options)
            data.check_fits(trainer.spec.input_shape, trainer.spec.num_classes)
            journal = await self._stack.enter_async_context(Journal.open(config.state.database))
            learner = RecordingLearner(
                SharedTrainerLearner(
                    trainer, holdout_split(data, config.data.holdout), config.training
                ),
                plain_log_dir(config),
            )
            agent = Agent(config, identity, journal, learner=learner)
            self.agents.append(agent)
            self._tasks.append(asyncio.create_task(agent.run(), name=f"agent {agent.device}"))

    def connected(self) -> int:
        return sum(1 for a in self.agents if a.transport is not None and a.transport.is_connected)

    def check(self) -> None:
        """Raise if an agent task ended on its own (it should serve until stopped)."""
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise MaskflError(f"{task.get_name()} crashed: {task.exception()!r}")

    async def stop(self, limit_s: float = 10.0) -> None:
        for agent in self.agents:
            agent.request_stop()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=limit_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._stack.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="maskfl-demo-agent",
        description="maskfl-agent run, plus a local log of the plain updates (demo only)",
    )
    parser.add_argument("--config", "-c", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"maskfl-demo-agent: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format)
    learner = RecordingLearner(LiteRTLearner(config.training, config.data), plain_log_dir(config))
    try:
        return asyncio.run(run_daemon(config, learner=learner))
    except MaskflError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
