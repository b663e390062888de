"""MQTT topic names and filters: validation and wildcard matching (MQTT 5 §4.7).

Pure functions, shared by the paho adapter (to refuse a bad topic before paho
raises a bare ``ValueError``) and by the in-memory twin (to route messages).
"""

from __future__ import annotations

from maskfl.protocol.errors import LocalProtocolError

_MAX_TOPIC_BYTES = 65_535
SHARE_PREFIX = "$share/"


def check_topic(topic: str) -> None:
    """Raise :class:`LocalProtocolError` unless ``topic`` is a valid topic name to publish to."""
    if not topic:
        raise LocalProtocolError("empty MQTT topic name")
    if "+" in topic or "#" in topic:
        raise LocalProtocolError(f"MQTT topic name {topic!r} must not contain wildcards")
    _check_common(topic)


def check_filter(topic_filter: str) -> None:
    """Raise :class:`LocalProtocolError` unless ``topic_filter`` is a valid subscription filter.

    Accepts shared subscriptions ``$share/<group>/<filter>``.
    """
    if not topic_filter:
        raise LocalProtocolError("empty MQTT topic filter")
    _check_common(topic_filter)
    group, inner = split_shared(topic_filter)
    if group is not None and (not group or "+" in group or "#" in group or not inner):
        raise LocalProtocolError(f"bad shared subscription {topic_filter!r}")
    levels = inner.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise LocalProtocolError(f"'#' must be a whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise LocalProtocolError(f"'+' must be a whole level in {topic_filter!r}")


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/g/a/b`` → ``("g", "a/b")``; any other filter → ``(None, filter)``."""
    if topic_filter.startswith(SHARE_PREFIX):
        group, _, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
        return group, inner
    return None, topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a message on ``topic`` is delivered to a subscription on ``topic_filter``.

    ``+`` matches exactly one level (which may be empty), ``#`` the rest of the
    levels including none (``a/#`` matches ``a``), and a filter that starts
    with a wildcard does not match topics beginning with ``$`` (MQTT 5 §4.7.2).
    A shared subscription matches like its inner filter.
    """
    _, inner = split_shared(topic_filter)
    if topic.startswith("$") and inner[:1] in ("+", "#"):
        return False
    f_levels = inner.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def _check_common(text: str) -> None:
    if "\x00" in text:
        raise LocalProtocolError(f"MQTT topic {text!r} contains NUL")
    if len(text.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise LocalProtocolError(f"MQTT topic longer than {_MAX_TOPIC_BYTES} bytes")
