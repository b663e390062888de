"""systemd unit files as the tests read them (deploy/systemd/*.service)."""

from __future__ import annotations

from pathlib import Path


def unit_directives(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` line of the unit at ``path``, by key, in file order (a key may
    repeat: ``ExecStartPre``, ``ReadWritePaths``); comments and section headers skipped."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found
