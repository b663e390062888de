"""What the status page and ``maskfl-coordinator devices`` show: rounds, models, devices.

Everything here is metadata the coordinator sees anyway: when a device was
heard from, which messages of which rounds it had accepted or rejected (and
why), whether its certificate is revoked, how long each phase took, how many
updates went into each aggregate and the figures published with each global
model. Never a device's model numbers: the coordinator holds only masked words
of any one device, and nothing here reads them.

Rounds and devices come from the store, so ``maskfl-coordinator devices`` shows
the same table from a second process while the coordinator runs. Rejections
are counted per device in memory and written to the store once per
housekeeping tick (:class:`RejectionLog`), so a flood of garbage costs one
small transaction a second, not one per message.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from maskfl.broker_coordinator.store import LOGGED_PHASES, Store
from maskfl.protocol.errors import MaskflError
from maskfl.protocol.identity import RevocationList
from maskfl.protocol.messages import RoundParams, decode_message
from maskfl.protocol.phases import Phase

log = logging.getLogger("maskfl.coordinator.fleetview")


ROLES = {"sum": "summer", "update": "updater"}

_EVALUATION_KEYS = ("evaluated_version", "examples", "accuracy", "loss")
_PRIVACY_KEYS = ("updates", "error_bound", "resolution", "epsilon", "delta")


class RejectionLog:
    """Rejected messages by device and reason, until the next flush to the store.

    At most ``max_pending`` (device, reason) pairs wait between flushes; beyond
    that a rejection is still counted in Prometheus but not per device, and
    ``overflow`` says how many were left out (logged once per flush).
    """

    def __init__(self, max_pending: int = 100_000) -> None:
        self.max_pending = max_pending
        self._pending: dict[tuple[str, str], list[float]] = {}
        self.overflow = 0
        self._overflow_logged = 0

    def note(self, device: str, reason: str, now: float) -> None:
        key = (device, reason)
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= self.max_pending:
                self.overflow += 1
                return
            self._pending[key] = [1.0, now]
            return
        entry[0] += 1
        entry[1] = max(entry[1], now)

    def take(self) -> list[tuple[str, str, int, float]]:
        """The pending rows ``(device, reason, count, last_at)``; the log is empty after."""
        rows = [(d, r, int(c), t) for (d, r), (c, t) in self._pending.items()]
        self._pending.clear()
        return rows

    async def flush(self, store: Store) -> None:
        rows = self.take()
        if self.overflow > self._overflow_logged:
            log.warning(
                "%d rejections not recorded per device (more than %d device/reason pairs "
                "between two flushes); they are in maskfl_coordinator_messages_total",
                self.overflow - self._overflow_logged,
                self.max_pending,
            )
            self._overflow_logged = self.overflow
        if not rows:
            return
        try:
            async with store.transaction() as tx:
                await tx.count_rejections(rows)
        except MaskflError as exc:
            log.warning("could not record %d per-device rejection counts: %s", len(rows), exc)


@dataclass
class Timeline:
    """Samples of live figures for the page (devices alive, rejections by reason).

    Bounded: the oldest sample goes first. In memory only: after a restart
    the lines start again (the counters they show are Prometheus counters,
    which restart too).
    """

    max_samples: int = 720
    samples: deque[tuple[float, int, dict[str, float]]] = field(default_factory=deque)

    def add(self, now: float, alive: int, rejected: Mapping[str, float]) -> None:
        self.samples.append((now, alive, dict(rejected)))
        while len(self.samples) > self.max_samples:
            self.samples.popleft()

    def as_json(self) -> dict[str, Any]:
        reasons = sorted({r for _, _, rej in self.samples for r in rej})
        return {
            "t": [t for t, _, _ in self.samples],
            "alive": [a for _, a, _ in self.samples],
            "rejected": {r: [rej.get(r, 0.0) for _, _, rej in self.samples] for r in reasons},
        }


def round_groups(params: bytes) -> int | None:
    """g, the round's number of mask groups, read from its stored signed ROUND_PARAMS
    (None if that does not parse: the history must still show the round)."""
    try:
        body = decode_message(params, max_size=1 << 20).body
    except MaskflError:
        return None
    return body.groups if isinstance(body, RoundParams) else None


async def round_history(
    store: Store, model_id: str, *, limit: int = 50, now: float
) -> list[dict[str, Any]]:
    """The last ``limit`` rounds, oldest first, each with the same keys.

    ``phases`` always holds every timed phase (seconds, or None when the round
    did not reach it); ``evaluation`` and ``privacy`` are None for a round
    that published no model.
    """
    rounds = list(reversed(await store.rounds(limit)))
    if not rounds:
        return []
    since = rounds[0].round_id
    opened: dict[int, list[tuple[Phase, float]]] = {}
    for rid, phase, at in await store.phase_log(since):
        opened.setdefault(rid, []).append((phase, at))
    counts = await store.participant_counts(since)
    models = {
        rid: (version, metrics)
        for version, rid, metrics in await store.model_metrics(model_id)
        if rid is not None and rid >= since
    }
    out = []
    for r in rounds:
        phases: dict[str, float | None] = dict.fromkeys(p.value for p in LOGGED_PHASES)
        log_ = opened.get(r.round_id, [])
        end = r.finished_at if r.finished_at is not None else now
        for i, (phase, at) in enumerate(log_):
            until = log_[i + 1][1] if i + 1 < len(log_) else end
            phases[phase.value] = max(0.0, until - at)
        c = counts.get(r.round_id, {})
        model = models.get(r.round_id)
        metrics = model[1] if model else {}
        out.append(
            {
                "round_id": r.round_id,
                "outcome": None if r.outcome is None else r.outcome.value,
                "phase": r.phase.value,
                "detail": r.detail,
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "duration_s": end - r.started_at,
                "phases": phases,
                "groups": round_groups(r.params),
                "summers": c.get("summers", 0),
                "updaters": c.get("updates", 0),
                "sum2": c.get("sum2", 0),
                "dropped": int(metrics.get("dropped", 0)),
                "model_version": model[0] if model else None,
                "privacy": None if model is None else {k: metrics.get(k) for k in _PRIVACY_KEYS},
                "evaluation": None
                if model is None or "accuracy" not in metrics
                else {k: metrics.get(k) for k in _EVALUATION_KEYS},
            }
        )
    return out


async def model_history(store: Store, model_id: str) -> list[dict[str, Any]]:
    """Every version of ``model_id`` with its round, published figures and evaluation.

    A version's evaluation is measured in the round that trains *from* it and
    published with the next version (its metrics name ``evaluated_version``);
    here it is shown against the version it measures. No weights.
    """
    rows = await store.model_metrics(model_id)
    evaluated = {int(m["evaluated_version"]): m for _, _, m in rows if "evaluated_version" in m}
    out = []
    for version, rid, metrics in rows:
        ev = evaluated.get(version, {})
        out.append(
            {
                "version": version,
                "round_id": rid,
                "updates": metrics.get("updates"),
                "error_bound": metrics.get("error_bound"),
                "examples": ev.get("examples"),
                "accuracy": ev.get("accuracy"),
                "loss": ev.get("loss"),
            }
        )
    return out


async def device_table(
    store: Store,
    *,
    revocations: RevocationList | None,
    recent_rounds: int = 5,
    alive: Mapping[str, float] | None = None,
    alive_since: float | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """One row per device the coordinator has accepted or rejected a message from
    (or, with ``limit``, the ``limit`` most recently heard from), sorted by id or,
    when limited, by last contact.

    ``roles`` covers the last ``recent_rounds`` rounds, newest first: ``summer``,
    ``updater`` or None (no accepted message that round). ``revoked`` is None
    for a device whose certificate serial the coordinator never learned (every
    message of it was rejected). ``alive`` is None unless the running
    coordinator's heartbeat table is given.
    """
    last = await store.last_round()
    latest = 0 if last is None else last.round_id
    since = max(1, latest - recent_rounds + 1)
    known = await _KnownDevices.load(store, since, alive or {})
    devices = sorted(set(known.seen) | set(known.rejected) | set(known.heard))
    if limit is not None and len(devices) > limit:
        # The most recently heard from; rows are only built for those (a large fleet's
        # page must not build one dict per device every refresh).
        by_contact = sorted(devices, key=lambda d: known.latest_contact(d) or 0.0, reverse=True)
        devices = by_contact[:limit]
    rounds = range(latest, since - 1, -1)
    return [known.row(d, revocations, alive_since, rounds) for d in devices]


@dataclass
class _KnownDevices:
    """What the store (and the heartbeat table, ``heard``) knows of each device, by id."""

    seen: dict[str, tuple[int, float, float]]
    accepted: dict[str, dict[str, int]]
    roles: dict[str, dict[int, str]]
    rejected: dict[str, dict[str, int]]
    last_rejected: dict[str, float]
    heard: Mapping[str, float]

    @classmethod
    async def load(cls, store: Store, since: int, heard: Mapping[str, float]) -> _KnownDevices:
        seen = {d: (serial, first, last_) for d, serial, first, last_ in await store.devices()}
        accepted: dict[str, dict[str, int]] = {}
        for d, kind, n in await store.device_messages():
            accepted.setdefault(d, {})[kind] = n
        roles: dict[str, dict[int, str]] = {}
        for d, rid, kind in await store.device_roles(since):
            if kind in ROLES:
                roles.setdefault(d, {})[rid] = ROLES[kind]
        rejected: dict[str, dict[str, int]] = {}
        last_rejected: dict[str, float] = {}
        for d, reason, n, at in await store.device_rejections():
            rejected.setdefault(d, {})[reason] = n
            last_rejected[d] = max(last_rejected.get(d, 0.0), at)
        return cls(seen, accepted, roles, rejected, last_rejected, heard)

    def latest_contact(self, device: str) -> float | None:
        times = [self.seen[device][2]] if device in self.seen else []
        times += [t for t in (self.last_rejected.get(device), self.heard.get(device)) if t]
        return max(times) if times else None

    def row(
        self,
        device: str,
        revocations: RevocationList | None,
        alive_since: float | None,
        rounds: range,
    ) -> dict[str, Any]:
        """One device's row of :func:`device_table`, its roles in ``rounds`` (newest first)."""
        serial, first_seen, _ = self.seen.get(device, (None, None, None))
        mine = self.accepted.get(device, {})
        revoked = None
        if serial is not None:
            revoked = revocations is not None and revocations.is_revoked(serial)
        return {
            "device": device,
            "serial": serial,
            "first_seen": first_seen,
            "last_seen": self.latest_contact(device),
            "alive": None
            if alive_since is None
            else self.heard.get(device, float("-inf")) >= alive_since,
            "revoked": revoked,
            "roles": [
                {"round_id": rid, "role": self.roles.get(device, {}).get(rid)} for rid in rounds
            ],
            "accepted": {k: mine.get(k, 0) for k in ("sum", "update", "sum2")},
            "rejected": self.rejected.get(device, {}),
        }
