"""Training data for the agent, from plugins in the entry-point group ``maskfl.datasources``.

Two ship, and neither needs more than ``maskfl[agent]``: ``digits`` (the 8x8 handwritten
digits, whose 45 KB of data ship inside the package, split between devices IID or
Dirichlet non-IID) and ``npz`` (a directory of ``.npz`` files on the device). A plugin is
a class whose keyword arguments are the options of ``[data]`` in agent.toml and whose
``load(device_index, n_devices)`` returns a :class:`Dataset`::

    [data]
    source = "digits"
    options = { shard = 3, shards = 10, partition = "dirichlet", alpha = 0.3 }

:func:`load_dataset` takes that section as it is (``shard``/``shards`` become the device
index and count); :func:`get_datasource` only builds the plugin. Register your own in
your package's metadata::

    [project.entry-points."maskfl.datasources"]
    camera = "mypkg.data:CameraSource"

A plugin's own dependencies belong in its package's requirements; if it imports one
that is missing, the error names the plugin and the missing module, and ``maskfl-agent
check`` reports it before the daemon runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from maskfl.agent.datasources._base import Dataset, DataSource, DataSourceError

__all__ = [
    "GROUP",
    "DataSource",
    "DataSourceError",
    "Dataset",
    "available_datasources",
    "get_datasource",
    "load_dataset",
]

GROUP = "maskfl.datasources"
"""The entry-point group data-source plugins register in."""


def available_datasources() -> list[str]:
    """Names of the installed data sources, sorted."""
    return sorted({ep.name for ep in metadata.entry_points(group=GROUP)})


def get_datasource(name: str, options: Mapping[str, Any] | None = None) -> DataSource:
    """Build the data source ``name`` with ``options`` as keyword arguments.

    Raises :class:`DataSourceError` for an unknown name (listing the installed ones),
    a plugin that does not import, or an option the plugin does not take.
    """
    options = dict(options or {})
    found = [ep for ep in metadata.entry_points(group=GROUP) if ep.name == name]
    if not found:
        raise DataSourceError(
            f"no data source called {name!r}; installed: "
            f"{', '.join(available_datasources()) or 'none'}",
            field="data.source",
        )
    try:
        factory = found[0].load()
    except (ImportError, AttributeError) as exc:
        raise DataSourceError(
            f"data source {name!r} ({found[0].value}) does not import: {exc}", field="data.source"
        ) from exc
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params)) if not takes_any else []
    if unknown:
        known = ", ".join(p for p in params if p != "self") or "none"
        raise DataSourceError(
            f"data source {name!r} has no option(s) {', '.join(unknown)}; its options: {known}",
            field=f"data.options.{unknown[0]}",
        )
    try:
        source = factory(**options)
    except TypeError as exc:
        raise DataSourceError(
            f"data source {name!r}: bad options {options}: {exc}", field="data.options"
        ) from exc
    if not isinstance(source, DataSource):
        raise DataSourceError(
            f"data source {name!r} ({found[0].value}) has no load(device_index, n_devices)",
            field="data.source",
        )
    return source


def load_dataset(name: str, options: Mapping[str, Any] | None = None) -> Dataset:
    """The data of this device, as configured in ``[data]``: ``shard`` (default 0) and
    ``shards`` (default 1) in ``options`` are the device index and count; the other
    options go to the plugin."""
    rest = dict(options or {})
    shard, shards = rest.pop("shard", 0), rest.pop("shards", 1)
    if not isinstance(shard, int) or not isinstance(shards, int):
        raise DataSourceError(
            f"shard and shards must be integers, not {shard!r} and {shards!r}",
            field="data.options.shard",
        )
    return get_datasource(name, rest).load(shard, shards)
