"""Logging for the agent: one line per event, text (journald adds the time) or JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

__all__ = ["setup_logging"]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    converter = time.gmtime  # type: ignore[assignment]

    def __init__(self, *, timestamps: bool = True) -> None:
        stamp = "%(asctime)sZ " if timestamps else ""
        super().__init__(f"{stamp}%(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configure the root logger to stderr (replacing earlier handlers).

    Under systemd (``JOURNAL_STREAM`` set) text lines carry no timestamp: journald
    stamps every line itself.
    """
    handler = logging.StreamHandler(sys.stderr)
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(
        _JsonFormatter() if fmt == "json" else _TextFormatter(timestamps=not journald)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # paho logs through our transport adapter; keep third-party chatter down.
    logging.getLogger("asyncio").setLevel(logging.WARNING)
