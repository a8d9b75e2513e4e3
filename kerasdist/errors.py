"""Exceptions shared across kerasdist, and how recovery treats them.

Kept free of TensorFlow so the launcher can import it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "PermanentError"]


class PermanentError(Exception):
    """A deterministic failure that restarting cannot fix.

    Bad configuration, a backup directory that belongs to another model, an
    argument that can never work. Recovery does **not** retry it: under
    `kerasdist-run` a worker that dies from one exits with
    `kerasdist.launch.protocol.PERMANENT_EXIT_CODE` (78, `EX_CONFIG`) and the
    launcher stops the group at once instead of spending its restarts.

    Subclass it together with the builtin that fits, e.g.
    `class BackupMismatchError(PermanentError, ValueError)`, so callers that
    catch `ValueError` keep working.

    Example:

    >>> class BadFlag(PermanentError, ValueError):
    ...     pass
    >>> isinstance(BadFlag("x"), ValueError)
    True
    """


class ConfigError(PermanentError, ValueError):
    """An invalid argument or configuration: permanent, and a `ValueError`.

    Raised for values that can never work (a shard policy that does not
    exist, a global batch that does not divide over the replicas, ...),
    before the first training step. As a `PermanentError`, a worker that
    dies from it under `kerasdist-run` exits 78 and is not restarted; as a
    `ValueError`, code that catches `ValueError` keeps working.

    Example:

    >>> issubclass(ConfigError, ValueError)
    True
    """
