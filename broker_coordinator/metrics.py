"""Prometheus metrics of the coordinator, on a private registry.

Names are prefixed ``maskfl_coordinator_``. Every rejection is counted by reason
(``messages_total{type, result, reason}``), so an operator can tell a hostile
client from a misconfigured one at a glance.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from maskfl.protocol.phases import Phase

_PREFIX = "maskfl_coordinator_"


class Metrics:
    """All the coordinator's instruments; one instance per process (or per test)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.phase = Gauge(
            _PREFIX + "phase", "1 for the phase the current round is in", ["phase"], registry=r
        )
        self.round_id = Gauge(_PREFIX + "round_id", "id of the current round", registry=r)
        self.rounds = Counter(
            _PREFIX + "rounds_total", "rounds ended, by outcome", ["outcome"], registry=r
        )
        self.messages = Counter(
            _PREFIX + "messages_total",
            "participant messages by type and result (accepted / rejected with reason)",
            ["type", "result", "reason"],
            registry=r,
        )
        self.bytes_in = Counter(
            _PREFIX + "bytes_in_total", "payload bytes received from the broker", registry=r
        )
        self.participants = Gauge(
            _PREFIX + "participants",
            "accepted participants of the current round, by role",
            ["role"],
            registry=r,
        )
        self.heartbeats = Counter(
            _PREFIX + "heartbeats_total",
            "messages on status/<device> by outcome (alive, gone, malformed, oversize, "
            "fleet_full); updated once a second",
            ["result"],
            registry=r,
        )
        self.devices_alive = Gauge(
            _PREFIX + "devices_alive", "devices heard from within the alive window", registry=r
        )
        self.liveness_listening = Gauge(
            _PREFIX + "liveness_listening",
            "1 while the coordinator reads heartbeats, 0 while it is unsubscribed from the "
            "status topics (a round's update and sum2 phases)",
            registry=r,
        )
        self._work_instruments(r)
        self._model_instruments(r)

    def _work_instruments(self, r: CollectorRegistry) -> None:
        """The coordinator's own work: commits, unmask, reassembly, MQTT, receipts."""
        self.aggregation_seconds = Histogram(
            _PREFIX + "aggregation_seconds",
            "time to add one group-commit batch of updates and make it durable",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_size = Histogram(
            _PREFIX + "commit_batch_size",
            "messages per group commit",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.unmask_seconds = Histogram(
            _PREFIX + "unmask_seconds",
            "time to vote, unmask, decode and apply the optimizer",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.reassembly_pending = Gauge(
            _PREFIX + "reassembly_pending", "chunked messages being reassembled", registry=r
        )
        self.reassembly_bytes = Gauge(
            _PREFIX + "reassembly_bytes", "bytes reserved by partial chunked messages", registry=r
        )
        self.message_memory = Gauge(
            _PREFIX + "message_memory_bytes",
            "received message bytes held in memory: partial, whole until settled, words kept "
            "(bound: pet.message_memory_max_bytes less the transport queue)",
            registry=r,
        )
        self.reassembly_spooled_bytes = Gauge(
            _PREFIX + "reassembly_spooled_bytes",
            "bytes reserved by partial chunked messages in the spool directory",
            registry=r,
        )
        self.reassembly_dropped = Counter(
            _PREFIX + "reassembly_dropped",
            "chunked messages not completed: refused (no room) or an admitted partial "
            "dropped (expired, superseded, spool_failed)",
            ["cause"],
            registry=r,
        )
        self.unacked = Gauge(
            _PREFIX + "unacked_messages", "MQTT deliveries held without ack", registry=r
        )
        self.model_version = Gauge(
            _PREFIX + "model_version", "version of the latest global model", registry=r
        )
        self.receipts_pending = Gauge(
            _PREFIX + "receipts_pending",
            "receipts the broker has not confirmed yet (each holds its message's ack)",
            registry=r,
        )
        self.receipts_failed = Counter(
            _PREFIX + "receipts_failed_total",
            "receipts the broker refused (e.g. an ACL without write access to receipts/)",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            _PREFIX + "mqtt_connected", "1 while the broker link is up", registry=r
        )

    def _model_instruments(self, r: CollectorRegistry) -> None:
        """The global model's fleet evaluation, one series per label."""
        self.model_accuracy = Gauge(
            "maskfl_model_accuracy",
            "fleet accuracy of the global model on the updaters' held-out data (federated "
            "evaluation under masking: only fleet totals are unmasked)",
            ["model_version"],
            registry=r,
        )
        self.model_loss = Gauge(
            "maskfl_model_loss",
            "mean loss per example of the global model on the updaters' held-out data",
            ["model_version"],
            registry=r,
        )
        self.model_eval_examples = Gauge(
            "maskfl_model_evaluation_examples",
            "held-out examples behind maskfl_model_accuracy and maskfl_model_loss",
            ["model_version"],
            registry=r,
        )

    evaluation: dict[str, float | int] | None = None
    """The latest fleet evaluation (for ``/status``), None before the first."""

    def set_evaluation(self, version: int, accuracy: float, loss: float, examples: int) -> None:
        """The latest evaluated version only: one series each, not one per version ever."""
        self.evaluation = {
            "evaluated_version": version,
            "examples": examples,
            "accuracy": accuracy,
            "loss": loss,
        }
        for gauge in (self.model_accuracy, self.model_loss, self.model_eval_examples):
            gauge.clear()
        label = str(version)
        self.model_accuracy.labels(model_version=label).set(accuracy)
        self.model_loss.labels(model_version=label).set(loss)
        self.model_eval_examples.labels(model_version=label).set(examples)

    def set_phase(self, phase: Phase) -> None:
        for p in Phase:
            self.phase.labels(phase=p.value).set(1 if p == phase else 0)

    def count(self, kind: str, reason: str | None) -> None:
        if reason is None:
            self.messages.labels(type=kind, result="accepted", reason="").inc()
        else:
            self.messages.labels(type=kind, result="rejected", reason=reason).inc()

    def rejected_total(self) -> dict[str, float]:
        """Rejections by reason (summed over types), for status and tests."""
        out: dict[str, float] = {}
        for metric in self.messages.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("result") == "rejected":
                    reason = sample.labels["reason"]
                    out[reason] = out.get(reason, 0.0) + sample.value
        return out

    def render(self) -> bytes:
        return generate_latest(self.registry)
