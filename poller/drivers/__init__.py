"""Driver registry: which class runs which job kind.

Registration is explicit (no decorators, nothing at import time). `build_drivers` instantiates
each class once per process and maps every kind it serves to that instance.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Collection
from typing import TYPE_CHECKING

from poller.drivers.base import Driver, DriverFactory
from poller.errors import UnknownJobKindError
from poller.wire import JobKind

if TYPE_CHECKING:
    from poller.config import PollerSettings

__all__ = ["DRIVERS", "build_drivers", "driver_classes", "get_driver"]

# cryptography 51 deprecates DSA and warns when asyncssh (drivers.ssh) merely names the DSA key
# types at import: five lines on stderr at every start, about no key in use. Only those go.
warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")


def _registry() -> dict[JobKind, type[DriverFactory]]:
    from poller.drivers.cli import CliDriver  # noqa: PLC0415 - keeps scrapli off import time
    from poller.drivers.icmp import IcmpDriver  # noqa: PLC0415 - keeps icmplib off import time
    from poller.drivers.snmp import SnmpDriver  # noqa: PLC0415 - keeps pysnmp off import time
    from poller.drivers.ssh import SshExecDriver  # noqa: PLC0415 - keeps asyncssh off import time
    from poller.drivers.tcp import TcpDriver  # noqa: PLC0415 - imported like the others

    classes: list[type[DriverFactory]] = [
        SnmpDriver,
        SshExecDriver,
        CliDriver,
        IcmpDriver,
        TcpDriver,
    ]
    return {kind: cls for cls in classes for kind in cls.kinds}


#: Filled on first use by `build_drivers`.
DRIVERS: dict[JobKind, type[DriverFactory]] = {}


def driver_classes() -> dict[JobKind, type[DriverFactory]]:
    """`DRIVERS`, filled on first call (importing every driver module)."""
    if not DRIVERS:
        DRIVERS.update(_registry())
    return DRIVERS


def build_drivers(
    settings: PollerSettings, kinds: Collection[str] | None = None
) -> dict[str, Driver]:
    """One instance of every driver class, keyed by each job kind it runs.

    `kinds`: only the classes that run one of these (`poller exec` runs one job: a driver it
    does not need is neither started nor heard from, e.g. `ping_not_permitted` for an SNMP job).
    """
    driver_classes()
    instances: dict[type[DriverFactory], Driver] = {}
    out: dict[str, Driver] = {}
    wanted = None if kinds is None else {DRIVERS[k] for k in DRIVERS if k.value in kinds}
    for kind, cls in DRIVERS.items():
        if wanted is not None and cls not in wanted:
            continue
        if cls not in instances:
            instances[cls] = cls.from_settings(settings)
        out[kind.value] = instances[cls]
    return out


def get_driver(drivers: dict[str, Driver], kind: str) -> Driver:
    """The driver for `kind`, or `UnknownJobKindError` naming the nearest known kind."""
    try:
        return drivers[kind]
    except KeyError:
        near = difflib.get_close_matches(kind, list(drivers), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise UnknownJobKindError(f"this poller has no driver for {kind!r}{hint}") from None
