"""Where the broker keeps its data (``node.data_dir``) when the configuration
does not say: the durable store, the built-in user and rule database, and
the development PKI (``certs/`` in it).

The rule, in order (docs/config.md, ``node``):

1. ``node.data_dir`` set in the file or by ``BASTIONMQ_NODE__DATA_DIR``: that,
   relative to the working directory.
2. The working directory holds ``etc/bastionmq.conf`` (a checkout, or a
   directory an operator laid out the same way): ``data``, relative to it.
   The shipped configuration's relative paths (``etc/acl.conf``, say) are
   relative to the working directory too, so its data sits beside them.
3. ``$XDG_DATA_HOME`` set to an absolute path: ``$XDG_DATA_HOME/bastionmq``
   (root included: whoever sets it asks for it).
4. root: ``/var/lib/bastionmq``, where Debian's Mosquitto and EMQX packages
   keep theirs.
5. anyone else: ``~/.local/share/bastionmq`` (the XDG default).

A broker installed with pip and started from any directory thus never
scatters ``data/`` folders over the places it was started from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs

__all__ = ["DataDir", "PROJECT_CONFIG", "SYSTEM_DIR", "choose"]

#: The file whose presence in the working directory makes it a project directory.
PROJECT_CONFIG = os.path.join("etc", "bastionmq.conf")
#: root's default, as the distributions' MQTT broker packages have it.
SYSTEM_DIR = "/var/lib/bastionmq"
#: The data directory of a project directory, relative to it.
PROJECT_DIR = "data"


@attrs.define(slots=True, frozen=True)
class DataDir:
    """The data directory in use and why it was chosen."""

    path: str
    #: Why, in an operator's words (start-up logs it, check-config prints it).
    reason: str
    #: Whether ``node.data_dir`` named it.
    configured: bool = False

    def describe(self) -> str:
        """The line start-up logs and check-config prints."""
        return f"data_dir {self.path} ({self.reason})"


def choose(configured: str | None, *, cwd: str | None = None,
           env: Mapping[str, str] | None = None, euid: int | None = None) -> DataDir:
    """The data directory for a ``node.data_dir`` of ``configured`` (None: not
    set). ``cwd``, ``env`` and ``euid`` default to the process's own; tests
    pass them to try every branch without being root or moving HOME."""
    if configured is not None:
        return DataDir(configured, "node.data_dir", configured=True)
    cwd = os.getcwd() if cwd is None else cwd
    env = os.environ if env is None else env
    if os.path.isfile(os.path.join(cwd, PROJECT_CONFIG)):
        return DataDir(PROJECT_DIR, f"project default: no data_dir configured and "
                                    f"{PROJECT_CONFIG} is in the working directory")
    xdg = env.get("XDG_DATA_HOME", "")
    # The XDG specification: a relative value is invalid and ignored.
    if os.path.isabs(xdg):
        return DataDir(os.path.join(xdg, "bastionmq"),
                       "per-user default: no data_dir configured, not run from a project "
                       "directory, XDG_DATA_HOME set")
    if (os.geteuid() if euid is None else euid) == 0:
        return DataDir(SYSTEM_DIR, "system default for root: no data_dir configured and "
                                   "not run from a project directory")
    home = env.get("HOME") or os.path.expanduser("~")
    return DataDir(os.path.join(home, ".local", "share", "bastionmq"),
                   "per-user default: no data_dir configured and not run from a "
                   "project directory")
