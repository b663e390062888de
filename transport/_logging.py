"""One logging convention for the coordinator and the agent: text or JSON lines on stderr.

``auto`` (the default of both services' ``format`` setting) is text on a terminal and
under systemd's journal (``JOURNAL_STREAM``), JSON everywhere else (containers, files,
log shippers). Text lines are ``2026-01-31T12:00:00Z INFO logger: message`` (UTC; no
timestamp under journald, which stamps lines itself). JSON lines are one object each:
``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``msg``, every extra
field a log call gives (``extra={"round_id": 3}``), and ``exc`` for a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Literal, TextIO

__all__ = ["LOG_FORMATS", "LogFormat", "resolve_log_format", "setup_logging"]

LogFormat = Literal["auto", "text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "text", "json")

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self, *, timestamps: bool = True) -> None:
        stamp = "%(asctime)sZ " if timestamps else ""
        super().__init__(f"{stamp}%(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")


def _journald(env: Mapping[str, str]) -> bool:
    return bool(env.get("JOURNAL_STREAM"))


def resolve_log_format(
    fmt: LogFormat, stream: TextIO | None = None, env: Mapping[str, str] | None = None
) -> Literal["text", "json"]:
    """``text`` or ``json`` for ``fmt``; ``auto`` is text on a terminal or under journald."""
    if fmt in ("text", "json"):
        return "text" if fmt == "text" else "json"
    stream = sys.stderr if stream is None else stream
    env = os.environ if env is None else env
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return "text" if terminal or _journald(env) else "json"


def setup_logging(level: str = "INFO", fmt: LogFormat = "auto") -> None:
    """Configure the root logger to stderr (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    if resolve_log_format(fmt) == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(timestamps=not _journald(os.environ)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # paho logs through our transport adapter; keep third-party chatter down.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
