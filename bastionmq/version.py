"""The installed distribution's version, in a module of its own so that the
package's modules can read it without importing the package itself."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("bastionmq")
except PackageNotFoundError:  # pragma: no cover - running from an unusual layout
    __version__ = "0.0.0"
