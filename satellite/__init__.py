"""satellite: the core-side toolkit of the satellite poller.

Declare and provision satellites, submit and call jobs, follow results, fleet status, DLQ replay.

`Client` is the Python API; `satellite.cli` is the command line built on it.

The names below are imported when first used (PEP 562): `python -m satellite serve` and the
`satellite` command import this package before anything else, and its stop-signal recorder
(satellite/__main__.py) must be in place before the client's libraries take their time to load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from poller import __version__  # one version for the package (pyproject.toml reads it there)

if TYPE_CHECKING:
    from satellite.client import Client
    from satellite.config import CoreSettings, load_core_settings
    from satellite.dispatch import InvalidJobError, NoResultError, SenderPolicy, build_job
    from satellite.topology import DeclareReport, Outcome

__all__ = [
    "Client",
    "CoreSettings",
    "DeclareReport",
    "InvalidJobError",
    "NoResultError",
    "Outcome",
    "SenderPolicy",
    "__version__",
    "build_job",
    "load_core_settings",
]

#: Where each public name lives.
_HOMES = {
    "Client": "satellite.client",
    "CoreSettings": "satellite.config",
    "load_core_settings": "satellite.config",
    "InvalidJobError": "satellite.dispatch",
    "NoResultError": "satellite.dispatch",
    "SenderPolicy": "satellite.dispatch",
    "build_job": "satellite.dispatch",
    "DeclareReport": "satellite.topology",
    "Outcome": "satellite.topology",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'satellite' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
