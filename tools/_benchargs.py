"""Argument types shared by the ``maskfl-bench`` subcommands."""

from __future__ import annotations

import argparse


def count(text: str) -> int:
    """A positive whole number, also written like ``1e6`` (``--m 1e6``)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value.is_integer() or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(value)
