"""Config files plus ``MASKFL__`` environment overrides: one merge rule and one error line.

The agent and the coordinator each read one TOML file and let the environment
override any key of it, later wins::

    defaults  <  the TOML file  <  MASKFL__SECTION__KEY (nested with "__")

``MASKFL__PET__SUM__TIME_MAX_S=15`` is ``[pet.sum] time_max_s = 15``. An override is
merged key by key into the file's tables, exactly like a TOML file that sets only
that key: it changes that one key, and every key left out keeps its default.

An environment value is read as a TOML value would be: ``64`` is an integer,
``1e-5`` a float, ``true`` a boolean, ``["22:00-06:00"]`` an array,
``{ shard = 0, shards = 4 }`` a table. Text that is not a TOML value
(``localhost``, ``10.0.0.2``, ``fedadam``) is taken as written, and so is any
value of a key whose type is text (names, hosts, paths): ``MASKFL__FLEET__ID=2024``
is the string ``"2024"``. Both services read the same prefix, so a variable whose
first part is a section of the other service only (``MASKFL__PET__...`` seen by
the agent, :data:`SECTIONS`) is left to it; one that names no section of either
(``MASKFL__BROKR__PORT``) is an unknown key, reported with the closest section.

:func:`describe_errors` turns validation errors (pydantic's ``errors()`` list of
dicts) into one line that names each field once, says which environment variable
set it, suggests the closest key for a misspelt one and keeps validator wording
free of library prefixes.

Pure functions of their arguments (the environment is passed in). The schema is
a pydantic model class, read through its ``model_fields`` mapping only, so this
module imports no pydantic.
"""

from __future__ import annotations

import difflib
import json
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import PurePath
from typing import Any

__all__ = [
    "ENV_PREFIX",
    "SECTIONS",
    "EnvOrigins",
    "describe_errors",
    "env_overrides",
    "env_variable_for",
    "field_names",
    "merge",
    "parse_env_value",
]

ENV_PREFIX = "MASKFL__"

#: The top-level tables of each service's config (a test checks them against the
#: models): an override for a section of the other service is not a mistake.
SECTIONS: dict[str, frozenset[str]] = {
    "agent": frozenset(
        {
            "broker",
            "data",
            "device",
            "guards",
            "heartbeat",
            "limits",
            "logging",
            "state",
            "training",
        }
    ),
    "coordinator": frozenset(
        {
            "aggregation",
            "broker",
            "fleet",
            "http",
            "identity",
            "log",
            "masking",
            "model",
            "optimizer",
            "pet",
            "privacy",
            "registry",
            "storage",
        }
    ),
}

#: Which environment variable set which key path (lower-case parts).
EnvOrigins = dict[tuple[str, ...], str]

_TEXT_TYPES = (str, PurePath)


def _fields(schema: Any) -> Mapping[str, Any] | None:
    fields = getattr(schema, "model_fields", None)
    return fields if isinstance(fields, Mapping) else None


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (``X | None``) or ``Annotated[X, ...]``, flattened."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _model_in(annotation: Any) -> Any:
    """The nested model class a field holds, if any."""
    return next((m for m in _members(annotation) if _fields(m) is not None), None)


def _is_mapping(annotation: Any) -> bool:
    return any(
        typing.get_origin(m) in (dict, Mapping) or m in (dict, Mapping)
        for m in _members(annotation)
    )


def _is_text(annotation: Any) -> bool:
    """Whether every alternative of the field's type is text (str, a path, string literals)."""
    found = False
    for member in _members(annotation):
        if member is type(None):
            continue
        if typing.get_origin(member) is typing.Literal:
            if not all(isinstance(v, str) for v in typing.get_args(member)):
                return False
        elif not (isinstance(member, type) and issubclass(member, _TEXT_TYPES)):
            return False
        found = True
    return found


def parse_env_value(raw: str, *, text: bool = False) -> Any:
    """``raw`` read as a TOML value; text that is no TOML value is returned as written.

    With ``text`` (the key's type is text) only a quoted TOML string is unquoted;
    anything else stays the string given. JSON arrays and objects are accepted too.
    """
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
        if not text and raw.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
    if text and not isinstance(value, str):
        return raw
    return value


def field_names(schema: Any, path: Sequence[str]) -> list[str]:
    """The keys the table at ``path`` of ``schema`` accepts (empty when unknown)."""
    current = schema
    for part in path:
        fields = _fields(current)
        if fields is None or part not in fields:
            return []
        current = _model_in(fields[part].annotation)
    fields = _fields(current)
    return sorted(fields) if fields is not None else []


def env_overrides(
    environ: Mapping[str, str], schema: Any, prefix: str = ENV_PREFIX
) -> tuple[dict[str, Any], EnvOrigins]:
    """The nested table the ``prefix`` variables of ``environ`` set, and who set what.

    Parts are matched case-insensitively and stored lower-case. A variable whose
    first part is a section of another service only (:data:`SECTIONS`) is skipped;
    any other unknown key is kept, so validation reports it (with the variable's
    name, through ``origins``).
    """
    top = _fields(schema) or {}
    others = frozenset().union(*SECTIONS.values()) - set(top)
    tree: dict[str, Any] = {}
    origins: EnvOrigins = {}
    for name in sorted(environ, key=lambda n: (n.count("__"), n)):
        if not name.upper().startswith(prefix.upper()):
            continue
        parts = [p.lower() for p in name[len(prefix) :].split("__")]
        if not parts or "" in parts or parts[0] in others:
            continue
        text = False
        current: Any = schema
        for index, part in enumerate(parts):
            fields = _fields(current)
            if fields is None or part not in fields:
                text = False
                break
            annotation = fields[part].annotation
            if _is_mapping(annotation) and index < len(parts) - 1:
                text = False  # keys inside a free-form table: their values are TOML values
                break
            text = _is_text(annotation)
            current = _model_in(annotation)
        table = tree
        for part in parts[:-1]:
            child = table.get(part)
            if not isinstance(child, dict):
                child = table[part] = {}
            table = child
        value = parse_env_value(environ[name], text=text)
        previous = table.get(parts[-1])
        if isinstance(previous, dict) and isinstance(value, dict):
            value = merge(value, previous)
        table[parts[-1]] = value
        origins[tuple(parts)] = name
    return tree, origins


def env_variable_for(
    field: str, environ: Mapping[str, str], prefix: str = ENV_PREFIX
) -> str | None:
    """The name of the variable in ``environ`` that sets the dotted ``field``, if one does.

    For checks after loading (a file that does not exist), so their one line can
    say where the value came from, as validation errors do.
    """
    wanted = (prefix + "__".join(field.split("."))).upper()
    return next((name for name in environ if name.upper() == wanted), None)


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in table by table (a new dict; inputs unchanged)."""
    out = dict(base)
    for key, value in overrides.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            out[key] = merge(below, value)
        else:
            out[key] = value
    return out


def _origin(loc: tuple[str, ...], origins: EnvOrigins) -> str:
    """``environment variable X`` for the variables that set ``loc`` or a key below it."""
    names = sorted(
        name
        for path, name in origins.items()
        if path[: len(loc)] == loc or loc[: len(path)] == path
    )
    if not names:
        return ""
    word = "variable" if len(names) == 1 else "variables"
    return f"set by environment {word} {', '.join(names)}"


def _suggest(schema: Any, loc: tuple[str, ...], origins: EnvOrigins, prefix: str) -> str:
    known = field_names(schema, loc[:-1])
    close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    if not close:
        return "remove it or fix its spelling"
    below = sorted(path for path in origins if path[: len(loc)] == loc)
    if below:  # the same variable, spelt right
        fixed = prefix + "__".join((*loc[:-1], close[0], *below[0][len(loc) :])).upper()
        return f"did you mean {close[0]} ({fixed})?"
    return f"did you mean {close[0]}?"


_LIBRARY_PREFIXES = ("Value error, ", "Assertion failed, ")


def describe_errors(
    errors: Iterable[Mapping[str, Any]],
    schema: Any,
    origins: EnvOrigins | None = None,
    prefix: str = ENV_PREFIX,
) -> tuple[str, str | None]:
    """One line for a list of validation errors, and the first field's dotted name.

    Each error reads ``field: what is wrong (the value given, the variable that
    set it); the fix``, and several are joined with ``"; "``.
    """
    origins = origins or {}
    parts: list[str] = []
    first: str | None = None
    for err in errors:
        loc = tuple(str(p) for p in err.get("loc", ()) if p != "__root__")
        where = ".".join(loc) or "(top level)"
        first = first or ".".join(loc) or None
        kind = err.get("type", "")
        message = str(err.get("msg", "invalid"))
        for lead in _LIBRARY_PREFIXES:
            message = message.removeprefix(lead)
        if not loc and kind not in ("extra_forbidden", "missing"):
            # A rule across sections: its text names the fields; say which of them
            # the environment set.
            named = sorted(n for p, n in origins.items() if ".".join(p) in message)
            word = "variable" if len(named) == 1 else "variables"
            parts.append(message + (f" ({word} {', '.join(named)})" if named else ""))
            continue
        origin = _origin(loc, origins) if loc else ""
        if kind == "extra_forbidden":
            seen = f" ({origin})" if origin else ""
            parts.append(f"{where}: unknown key{seen}; {_suggest(schema, loc, origins, prefix)}")
            continue
        if kind == "missing":
            env_name = prefix + "__".join(loc).upper()
            parts.append(f"{where}: required; add it to the config file (or set {env_name})")
            continue
        given = err.get("input")
        shown_input = not isinstance(given, dict | list | tuple) and given is not None
        notes = [f"got {given!r}"] if shown_input else []
        notes += [origin] if origin else []
        shown = f" ({', '.join(notes)})" if notes else ""
        parts.append(f"{where}: {message}{shown}")
    return "; ".join(parts), first
