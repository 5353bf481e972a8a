"""Seed data shipped inside the package: the namespace tree, the latency table and
example energy and price figures.

The files sit next to this module, so they are installed with the package (wheel or
editable); readers find them with :func:`path`.  ``seeds/README.md`` says where the data
comes from.  ``tools/gen_latency.py`` rewrites ``latency.json`` in a source checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from schemas.errors import ConfigError

__all__ = ["ENERGY", "LATENCY", "NAMESPACES", "path", "require"]

NAMESPACES = "namespaces.json"
"""The 1+M+N namespace tree ``cpi up`` and ``registry.national`` create."""

LATENCY = "latency.json"
"""The estimated region-to-region RTT table the resolver ranks ``near`` with."""

ENERGY = "energy.json"
"""EXAMPLE site energy figures per region and prices per accelerator model, which the
simulated nodes put into their records (not measurements; seeds/README.md)."""


def require(file: Path, what: str) -> Path:
    """``file`` if it is an existing file, else a :class:`ConfigError` naming it."""
    if not file.is_file():
        raise ConfigError(f"{what} {file}: no such file")
    return file


def path(name: str) -> Path:
    """The seed file ``name`` of the installed package (a :class:`ConfigError` if absent)."""
    return require(Path(str(resources.files(__name__).joinpath(name))), "seed file")
