"""maskfl.agent: the device daemon (``maskfl-agent``).

Modules: :mod:`~maskfl.agent.config` (agent.toml, the source of truth for its keys),
:mod:`~maskfl.agent.daemon` (MQTT session, message checks, heartbeats, systemd),
:mod:`~maskfl.agent.rounds` (one round: summer or updater, step by step),
:mod:`~maskfl.agent.state` (the SQLite journal), :mod:`~maskfl.agent.guards` (when the
device may train or sum), :mod:`~maskfl.agent.graphs` (received model graphs against
their signed digest), :mod:`~maskfl.agent.identity` (key and certificate files),
:mod:`~maskfl.agent.learning` (training glue), :mod:`~maskfl.agent.sdnotify` and
:mod:`~maskfl.agent.cli`; training itself in :mod:`maskfl.agent.training`, data in
:mod:`maskfl.agent.datasources`. Nothing is imported here, so importing a submodule
(a data-source plugin, say) does not load the daemon.
"""

__all__: list[str] = []
