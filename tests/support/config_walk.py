"""Walk an example config (configs/*.toml) key by key, for the override tests.

Every key of the example, set or commented out, becomes one :class:`Key`: its
dotted path, the example's value, whether the line documents a value other
than the default ("default ..." or "required" in its comment) and a second
valid value to set it to alone. The tests then load a minimal file (the
required keys only) with that one key added, in TOML and in the environment,
and compare the whole effective config with the minimal one.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import tomli_w

REPO = Path(__file__).resolve().parents[2]

# Keys that only make sense with others: the broker's TLS client files need tls = true,
# and a certificate needs its key (the same [broker] rules in agent and coordinator).
BROKER_TLS_COMPANIONS: dict[str, dict[str, Any]] = {
    "broker.ca_file": {"broker.tls": True},
    "broker.cert_file": {
        "broker.tls": True,
        "broker.cert_file": "a.pem",
        "broker.key_file": "a.key",
    },
    "broker.key_file": {
        "broker.tls": True,
        "broker.cert_file": "a.pem",
        "broker.key_file": "a.key",
    },
}

_HEADER = re.compile(r"^\s*\[([A-Za-z0-9_.]+)\]")
_KEY = re.compile(r"^(#\s*)?([a-z_0-9]+)\s*=")


@dataclass(frozen=True)
class Key:
    path: tuple[str, ...]
    value: Any  # as the example writes it
    commented: bool
    noted: bool  # the comment says the value is not the default (or that it is required)

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return "MASKFL__" + "__".join(self.path).upper()


def example_keys(file: Path) -> list[Key]:
    """Every ``key = value`` line of ``file`` (``# key = value`` too) under its table."""
    section: tuple[str, ...] = ()
    keys: list[Key] = []
    for line in file.read_text(encoding="utf-8").splitlines():
        if header := _HEADER.match(line):
            section = tuple(header.group(1).split("."))
            continue
        if keys and re.match(r"^\s+#", line):  # the comment of the key above, continued
            last = keys[-1]
            if re.search(r"\bdefault\b|\brequired\b", line) and not last.noted:
                keys[-1] = Key(last.path, last.value, last.commented, True)
            continue
        match = _KEY.match(line)
        if match is None:
            continue
        text = line[len(match.group(1) or "") :]
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue  # prose that happens to contain "word ="
        (name, value), *_ = parsed.items()
        comment = text.split("#", 1)[1] if "#" in text else ""
        noted = bool(re.search(r"\bdefault\b|\brequired\b", comment))
        keys.append(Key((*section, name), value, bool(match.group(1)), noted))
    return keys


def nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def flatten(
    tree: Any, path: tuple[str, ...] = (), stop: frozenset[str] = frozenset()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Leaves of a ``model_dump()``; tables named in ``stop`` count as one leaf."""
    if isinstance(tree, dict) and (not path or path[-1] not in stop):
        for k, v in tree.items():
            yield from flatten(v, (*path, k), stop)
    else:
        yield path, tree


def toml_text(value: Any) -> str:
    """``value`` as the right-hand side of a TOML line (what an env variable holds)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_text(v)}" for k, v in value.items()) + " }"
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def env_text(value: Any) -> str:
    """What an operator would export: strings bare, everything else as TOML writes it."""
    return value if isinstance(value, str) else toml_text(value)


def other_value(key: Key, default: Any, special: dict[str, Any]) -> Any:
    """A valid value for ``key`` that is not its default: the example's own value when that
    differs, else one derived from the default (``special`` for the keys with tight rules)."""
    if key.dotted in special:
        return special[key.dotted]
    same = key.value == default or (key.value == [] and default == ())
    same |= isinstance(default, PurePath) and key.value == str(default)
    if not same:
        return key.value
    value = key.value
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 1.0
    if isinstance(value, str):
        return value + "x" if value else "x"
    raise AssertionError(f"{key.dotted}: add a value to the special table")


def write(path: Path, tree: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(tree), encoding="utf-8")
    return path


Loader = Callable[[Path, dict[str, str]], Any]

REQUIRED = object()


def field_default(schema: Any, path: tuple[str, ...]) -> Any:
    """The model's default for ``path`` (:data:`REQUIRED` when it has none)."""
    current = schema
    for part in path[:-1]:
        current = current.model_fields[part].annotation
    info = current.model_fields[path[-1]]
    return REQUIRED if info.is_required() else info.get_default(call_default_factory=True)


class Walk:
    """One example file and its model: the minimal file, loads, and the comparisons."""

    def __init__(
        self,
        schema: Any,
        load: Loader,
        example: Path,
        *,
        special: dict[str, Any],
        companions: dict[str, dict[str, Any]],
        leaves: frozenset[str] = frozenset(),
    ) -> None:
        self.schema, self.load, self.example = schema, load, example
        self.special, self.companions, self.leaves = special, companions, leaves
        self.keys = example_keys(example)
        self.minimal: dict[str, Any] = {}
        for key in self.keys:
            if not key.commented and field_default(schema, key.path) is REQUIRED:
                self.minimal = merge(self.minimal, nest(key.path, key.value))

    def dump(self, path: Path, env: dict[str, str] | None = None) -> dict[tuple[str, ...], Any]:
        config = self.load(path, env or {})
        return dict(flatten(config.model_dump(), stop=self.leaves))

    @staticmethod
    def changed(a: dict[tuple[str, ...], Any], b: dict[tuple[str, ...], Any]) -> set[str]:
        return {".".join(p) for p in a.keys() | b.keys() if a.get(p) != b.get(p)}

    def new_value(self, key: Key) -> Any:
        """A valid value other than the one the minimal file gives ``key``."""
        default = field_default(self.schema, key.path)
        return other_value(key, key.value if default is REQUIRED else default, self.special)

    def base_tree(self, key: Key) -> dict[str, Any]:
        tree = self.minimal
        for dotted, value in self.companions.get(key.dotted, {}).items():
            tree = merge(tree, nest(tuple(dotted.split(".")), value))
        return tree
