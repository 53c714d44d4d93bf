"""satellite: the core-side toolkit of the satellite poller.

Declare and provision satellites, submit and call jobs, follow results, fleet status, DLQ replay.

`Client` is the Python API; `satellite.cli` is the command line built on it.
"""

from importlib.metadata import PackageNotFoundError, version

from satellite.client import Client
from satellite.config import CoreSettings, load_core_settings
from satellite.dispatch import InvalidJobError, NoResultError, SenderPolicy, build_job
from satellite.topology import DeclareReport, Outcome

try:
    __version__ = version("satellite-poller")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

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
