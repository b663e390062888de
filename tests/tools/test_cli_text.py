"""Every installed command answers ``--version`` and prints help as plain text.

The commands are read from the installed distribution's entry points, so a new
console script is covered without editing this file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
from collections.abc import Callable
from importlib import metadata

import pytest

from maskfl.protocol.messages import FORMAT_VERSION
from maskfl.protocol.version import package_version

SCRIPTS = sorted(
    (ep for ep in metadata.distribution("maskfl").entry_points if ep.group == "console_scripts"),
    key=lambda ep: ep.name,
)
# reST inline markup that a terminal would print literally
MARKUP = re.compile(r"``|:(mod|func|class|meth|data|attr):`")


def _run(main: Callable[[list[str]], object], argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0, f"{argv} exited {exited.value.code}"
    return out.getvalue()


def _parsers(
    prefix: str, parser: argparse.ArgumentParser
) -> list[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every subcommand's parser below it, with the command line naming it."""
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(f"{prefix} {name}", sub)
    return found


def test_every_script_is_listed() -> None:
    assert {ep.name for ep in SCRIPTS} >= {
        "maskfl-agent",
        "maskfl-bench",
        "maskfl-coordinator",
        "maskfl-demo",
        "maskfl-provision",
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda ep: ep.name)
def test_version(script: metadata.EntryPoint) -> None:
    text = _run(script.load(), ["--version"])
    assert text.strip() == f"{script.name} {package_version()} (message format {FORMAT_VERSION})"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda ep: ep.name)
def test_help_is_plain_text(script: metadata.EntryPoint) -> None:
    parsers = _parsers(script.name, importlib.import_module(script.module).build_parser())
    for name, parser in parsers:
        text = parser.format_help()
        assert not MARKUP.search(text), f"`{name} --help` prints reST markup:\n{text}"
