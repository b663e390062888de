"""The one error the provisioning tool raises for things the operator must fix."""

from __future__ import annotations

from maskfl.protocol.errors import ConfigError

__all__ = ["ProvisionError"]


class ProvisionError(ConfigError):
    """The fleet directory, an argument or a key cannot be used as asked.

    The message is one line that says what is wrong and what to do; the CLI
    prints it and exits with status 2.
    """
