"""Help text for argparse from docstrings written in reStructuredText.

Module docstrings double as ``--help`` descriptions; a terminal shows plain text, so
inline markup (````literal````, ``:mod:`x```, ```x```) loses its markers here.
"""

from __future__ import annotations

import re

__all__ = ["plain"]

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_INTERPRETED = re.compile(r"`([^`]+)`")


def plain(doc: str | None) -> str:
    """``doc`` without reST inline markup; an empty string for no docstring."""
    text = _ROLE.sub(r"\1", doc or "")
    text = _LITERAL.sub(r"\1", text)
    return _INTERPRETED.sub(r"\1", text)
