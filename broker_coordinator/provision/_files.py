"""Writing provisioning files: atomically, with the right modes, never half-written.

Everything a running service reads (the revocation list, the ACL, the CRL) is
replaced by writing a temporary file in the same directory, fsyncing it and
renaming it over the old one, so a reader sees either the old or the new file,
never a truncated one, and the file's mtime changes exactly once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from maskfl.broker_coordinator.provision.errors import ProvisionError

PRIVATE = 0o600
"""Private keys of the CA, of devices and of the coordinator."""
GROUP_READ = 0o640
"""The broker's TLS key: readable by the mosquitto group, never by the world."""
PUBLIC = 0o644
"""Certificates, public keys, configs."""
PRIVATE_DIR = 0o700
PUBLIC_DIR = 0o755


def write_atomic(path: Path, data: bytes | str, *, mode: int = PUBLIC) -> None:
    """Replace ``path`` with ``data`` in one rename; the mode is set before the rename.

    On error the old file is left untouched and the temporary file is removed.
    """
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ProvisionError(f"cannot write {path}: {exc.strerror or exc}") from exc
    _fsync_dir(path.parent)


def make_dir(path: Path, *, mode: int = PUBLIC_DIR) -> None:
    """Create ``path`` (and parents) and set its mode even if it already existed."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    except OSError as exc:
        raise ProvisionError(f"cannot create directory {path}: {exc.strerror or exc}") from exc


def read_bytes(path: Path, what: str) -> bytes:
    """Read a file the fleet directory must contain; a missing one is a one-line error."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ProvisionError(f"{what} not found: {path}") from exc
    except OSError as exc:
        raise ProvisionError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
