"""The installed package's version, for every command's ``--version``.

One line says both numbers an operator needs when reporting a problem: the release
(from the installed distribution's metadata) and the message format version that a
participant must speak (:data:`maskfl.protocol.messages.FORMAT_VERSION`).
"""

from __future__ import annotations

from importlib import metadata

from maskfl.protocol.messages import FORMAT_VERSION

__all__ = ["package_version", "version_text"]

DISTRIBUTION = "maskfl"


def package_version() -> str:
    """The installed release, or ``unknown`` when running from a tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def version_text(prog: str) -> str:
    """``maskfl-agent 0.1.0 (message format 1)``."""
    return f"{prog} {package_version()} (message format {FORMAT_VERSION})"
