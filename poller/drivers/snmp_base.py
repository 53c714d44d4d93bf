"""What every SNMP backend shares: the `SnmpBackend` seam, its types and the pure helpers.

The helpers render varbinds as DESIGN §4 says, convert set values, check walk progress, size
per-request timeouts from the job deadline, name error statuses and cap the output. The backends
(`snmp_pysnmp`, `snmp_netsnmp`) import this module and nothing of the driver; the driver
(`snmp.py`) imports this module and chooses a backend, so the imports form no circle.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol, get_args

from pydantic import JsonValue

from poller.errors import DeviceTimeoutError, JobError, OutputTooLargeError, SnmpError
from poller.wire import SetVarbind, SnmpAuth

__all__ = [
    "DEFAULT_PORT",
    "ERROR_STATUS_NAMES",
    "SMI_TYPES",
    "TIMEOUT_STEP",
    "OutputBudget",
    "SetValue",
    "SmiType",
    "SnmpBackend",
    "SnmpTarget",
    "SubtreeWalk",
    "Varbind",
    "WalkFetch",
    "WalkHook",
    "WalkPage",
    "WalkResult",
    "WalkStep",
    "error_status_name",
    "format_oid",
    "is_printable_text",
    "no_response_error",
    "oid_in_subtree",
    "parse_oid",
    "plan_timeout",
    "render_varbind",
    "set_value",
    "snmp_status_error",
    "varbind_json_size",
    "walk_roots",
    "walk_step",
    "walk_subtree",
]

DEFAULT_PORT = 161

#: SMI type names as they appear in a rendered varbind's `type`.
SmiType = Literal[
    "Integer",
    "OctetString",
    "ObjectIdentifier",
    "IpAddress",
    "Counter32",
    "Gauge32",
    "TimeTicks",
    "Opaque",
    "Counter64",
    "Null",
    "noSuchObject",
    "noSuchInstance",
    "endOfMibView",
]
SMI_TYPES: frozenset[str] = frozenset(get_args(SmiType))
_NUMERIC: frozenset[str] = frozenset({"Integer", "Counter32", "Gauge32", "TimeTicks", "Counter64"})
_BYTES: frozenset[str] = frozenset({"OctetString", "Opaque"})
_EXCEPTIONS: frozenset[str] = frozenset({"noSuchObject", "noSuchInstance", "endOfMibView"})

#: One rendered varbind: `{"oid", "type", "value"}` plus `"hex"` for OctetString and Opaque.
Varbind = dict[str, JsonValue]

#: RFC 3416 error-status values by number.
ERROR_STATUS_NAMES: tuple[str, ...] = (
    "noError",
    "tooBig",
    "noSuchName",
    "badValue",
    "readOnly",
    "genErr",
    "noAccess",
    "wrongType",
    "wrongLength",
    "wrongEncoding",
    "wrongValue",
    "noCreation",
    "inconsistentValue",
    "resourceUnavailable",
    "commitFailed",
    "undoFailed",
    "authorizationError",
    "notWritable",
    "inconsistentName",
)


# --------------------------------------------------------------------------------------------
# Pure helpers (no sockets, no pysnmp): shared by every backend, unit-tested on their own.


def parse_oid(oid: str) -> tuple[int, ...]:
    """`"1.3.6.1"` (or `".1.3.6.1"`) → `(1, 3, 6, 1)`."""
    return tuple(int(part) for part in oid.strip(".").split("."))


def format_oid(oid: Sequence[int]) -> str:
    """`(1, 3, 6, 1)` → `"1.3.6.1"` (no leading dot)."""
    return ".".join(str(part) for part in oid)


def oid_in_subtree(oid: Sequence[int], root: Sequence[int]) -> bool:
    """True when `oid` lies strictly below `root` (a walk of `root` may return it)."""
    return len(oid) > len(root) and tuple(oid[: len(root)]) == tuple(root)


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def is_printable_text(raw: bytes) -> str | None:
    """The text of an OCTET STRING when it is printable UTF-8, else None.

    Printable: valid UTF-8 without control characters (C0, DEL, C1) other than tab, CR and LF.
    A trailing NUL, as some agents append to C strings, makes it binary: `hex` keeps every byte.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if _CONTROL.search(text) else text


def render_varbind(oid: str, smi_type: SmiType, value: int | bytes | str | None) -> Varbind:
    """One varbind in the wire form of DESIGN §4.

    `value` is what the backend decoded: an int for Integer/Counter32/Gauge32/TimeTicks/
    Counter64, bytes for OctetString and Opaque, dotted text for ObjectIdentifier and IpAddress
    (or the 4 raw bytes of an IpAddress), None for Null and the three exception values.
    Unsigned32 has the same tag as Gauge32 on the wire: pass it as "Gauge32".
    """
    if smi_type in _NUMERIC:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{smi_type} needs an int, got {type(value).__name__}")
        return {"oid": oid, "type": smi_type, "value": value}
    if smi_type in _BYTES:
        if not isinstance(value, bytes):
            raise TypeError(f"{smi_type} needs bytes, got {type(value).__name__}")
        text = is_printable_text(value) if smi_type == "OctetString" else None
        return {"oid": oid, "type": smi_type, "value": text, "hex": value.hex()}
    if smi_type == "IpAddress":
        if isinstance(value, bytes):
            value = ".".join(str(b) for b in value)
        if not isinstance(value, str):
            raise TypeError(f"IpAddress needs text or bytes, got {type(value).__name__}")
        return {"oid": oid, "type": smi_type, "value": value}
    if smi_type == "ObjectIdentifier":
        if not isinstance(value, str):
            raise TypeError(f"ObjectIdentifier needs text, got {type(value).__name__}")
        return {"oid": oid, "type": smi_type, "value": value.removeprefix(".")}
    if smi_type == "Null" or smi_type in _EXCEPTIONS:
        return {"oid": oid, "type": smi_type, "value": None}
    raise ValueError(f"unknown SMI type {smi_type!r}")


def _json_len(value: JsonValue) -> int:
    """`len(json.dumps(value, ensure_ascii=False).encode())`, without json for plain values."""
    if value is None:
        return 4
    if isinstance(value, bool):
        return 4 if value else 5
    if isinstance(value, int):
        return len(str(value))
    if (
        isinstance(value, str)
        and value.isascii()
        and value.isprintable()
        and '"' not in value
        and "\\" not in value
    ):
        return len(value) + 2
    return len(json.dumps(value, ensure_ascii=False).encode())


def varbind_json_size(varbind: Varbind) -> int:
    """Bytes this varbind adds to the result body (its JSON plus a separating comma)."""
    # json.dumps's default separators: '{"k": v, "k": v}' plus one comma.
    size = 2 + 2 * (len(varbind) - 1) + 1 if varbind else 3
    for key, value in varbind.items():
        # `_json_len`'s plain text, inline: most values of a varbind are (one call a varbind).
        if (
            type(value) is str
            and value.isascii()
            and value.isprintable()
            and '"' not in value
            and "\\" not in value
        ):
            size += len(key) + 6 + len(value)
        else:
            size += len(key) + 4 + _json_len(value)
    return size


#: A set value after checking: the SMI type to send and its Python value.
SetValue = tuple[str, str, int | bytes | str]

_UNSIGNED_MAX = {
    "Counter32": 2**32 - 1,
    "Gauge32": 2**32 - 1,
    "Unsigned32": 2**32 - 1,
    "TimeTicks": 2**32 - 1,
    "Counter64": 2**64 - 1,
}


def set_value(index: int, vb: SetVarbind) -> SetValue:
    """Check one `snmp.set` varbind and convert its value: `(oid, type, value)`.

    Integer types need an int (or decimal text); OctetString and Opaque become bytes (UTF-8 of
    the text, or the decoded hex when `hex` is true); ObjectIdentifier and IpAddress stay text.
    Raises `SnmpError` naming the varbind when the value cannot be sent as that type.
    """
    where = f"varbinds[{index}] ({vb.oid})"
    if vb.type in ("OctetString", "Opaque"):
        if vb.hex:
            if not isinstance(vb.value, str):
                raise SnmpError(f"{where}: hex=true needs the value as a hex string")
            try:
                return vb.oid, vb.type, bytes.fromhex(vb.value)
            except ValueError:
                raise SnmpError(f"{where}: value is not valid hex") from None
        return vb.oid, vb.type, str(vb.value).encode()
    if vb.type == "ObjectIdentifier":
        text = str(vb.value)
        try:
            return vb.oid, vb.type, format_oid(parse_oid(text))
        except ValueError:
            raise SnmpError(f"{where}: value is not a numeric OID") from None
    if vb.type == "IpAddress":
        parts = str(vb.value).split(".")
        if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
            raise SnmpError(f"{where}: value is not a dotted IPv4 address")
        return vb.oid, vb.type, str(vb.value)
    try:
        number = vb.value if isinstance(vb.value, int) else int(vb.value, 10)
    except ValueError:
        raise SnmpError(f"{where}: {vb.type} needs an integer value") from None
    low, high = (-(2**31), 2**31 - 1) if vb.type == "Integer" else (0, _UNSIGNED_MAX[vb.type])
    if not low <= number <= high:
        raise SnmpError(f"{where}: {number} is out of range for {vb.type}")
    return vb.oid, vb.type, number


def error_status_name(status: int) -> str:
    """RFC 3416 name of an error-status (`genErr`), or `errorStatus(N)` for unknown values."""
    if 0 <= status < len(ERROR_STATUS_NAMES):
        return ERROR_STATUS_NAMES[status]
    return f"errorStatus({status})"


def no_response_error(where: str, *, v3: bool, before_deadline: bool = False) -> DeviceTimeoutError:
    """The `device_timeout` of an agent that did not answer, saying what else silence can mean.

    Agents drop requests with a wrong community without a word (they only count them), and
    some drop SNMPv3 requests they cannot authenticate or decrypt: from here that is a dead
    device, so the message says so. It names the kind of credential only, never a value.
    """
    when = " before the job deadline" if before_deadline else ""
    if v3:
        why = "wrong SNMPv3 credentials can look the same as a dead device: agents may drop them"
    else:
        why = "a wrong community looks the same as a dead device: agents drop such requests"
    return DeviceTimeoutError(f"no SNMP response from {where}{when} ({why})")


def snmp_status_error(
    status: int,
    index: int,
    oids: Sequence[str],
    varbinds: list[Varbind],
    *,
    offset: int = 0,
) -> SnmpError:
    """The `SnmpError` for an error-status in a response.

    `index` is the 1-based error-index of the PDU, `offset` how many of the job's `oids` were
    sent in earlier PDUs; the message names the job's varbind number and OID. `data` holds the
    varbinds gathered before (a partial walk, earlier PDUs of a get).
    """
    name = error_status_name(status)
    position = offset + index
    if index >= 1 and 1 <= position <= len(oids):
        message = f"agent answered {name} for varbind {position} ({oids[position - 1]})"
    else:
        message = f"agent answered {name}"
    return SnmpError(message, data={"varbinds": list(varbinds)})


@dataclass(frozen=True, slots=True)
class WalkStep:
    """What a walk does with one response: keep `accepted`, then go on from `next_oid` or stop.

    `non_increasing` is set when the agent broke the lexicographic order (an agent bug).
    """

    accepted: list[tuple[tuple[int, ...], int]]
    next_oid: tuple[int, ...] | None
    non_increasing: bool = False


def walk_step(
    root: tuple[int, ...],
    last: tuple[int, ...],
    returned: Sequence[tuple[tuple[int, ...], bool]],
) -> WalkStep:
    """Decide how a walk of `root` continues after a GETNEXT/GETBULK answer.

    `returned` is the answer in order, each `(oid, end_of_mib_view)`; `last` is the OID the
    request started from. Accepted entries are `(oid, position in returned)`. The walk stops at
    the first OID outside the subtree, at endOfMibView, on an empty answer, and at a
    non-increasing OID (reported, so the driver can turn it into an `snmp_error`).
    """
    accepted: list[tuple[tuple[int, ...], int]] = []
    previous = last
    for position, (oid, end) in enumerate(returned):
        if end or not oid_in_subtree(oid, root):
            return WalkStep(accepted, None)
        if oid <= previous:
            return WalkStep(accepted, None, non_increasing=True)
        accepted.append((oid, position))
        previous = oid
    return WalkStep(accepted, previous if accepted else None)


#: Granularity of per-request timeouts (pysnmp's timer ticks every 0.1 s).
TIMEOUT_STEP = 0.1


def plan_timeout(remaining: float, timeout: float, retries: int) -> tuple[float, int]:
    """Per-request `(timeout, retries)` so that all tries fit in the `remaining` seconds.

    The timeout is the configured one, shrunk to `remaining / (retries + 1)` when the deadline
    is near, rounded down to 0.1 s (at least 0.1 s); retries are dropped when even 0.1 s per
    try does not fit. The caller still bounds the whole request by the deadline itself.
    """
    retries = max(0, retries)
    if remaining <= 0:
        return TIMEOUT_STEP, 0
    while retries > 0 and remaining / (retries + 1) < TIMEOUT_STEP:
        retries -= 1
    per_try = min(timeout, remaining / (retries + 1))
    per_try = math.floor(round(per_try / TIMEOUT_STEP, 6)) * TIMEOUT_STEP
    return round(max(TIMEOUT_STEP, per_try), 1), retries


class OutputBudget:
    """Counts the JSON size of collected varbinds; past the cap raises `OutputTooLargeError`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = len('{"varbinds":[]}')
        self.varbinds: list[Varbind] = []

    def add(self, varbind: Varbind) -> None:
        size = varbind_json_size(varbind)
        if self.used + size > self.max_bytes:
            raise OutputTooLargeError(
                f"SNMP output exceeds the limit of {self.max_bytes} bytes after "
                f"{len(self.varbinds)} varbinds",
                data={"varbinds": list(self.varbinds)},
            )
        self.used += size
        self.varbinds.append(varbind)

    def extend(self, varbinds: Sequence[Varbind]) -> None:
        for vb in varbinds:
            self.add(vb)


# --------------------------------------------------------------------------------------------
# The backend seam


class SnmpTarget(NamedTuple):
    """One job's agent, credentials and limits, as a backend sees them (a named tuple: one is
    made per job)."""

    host: str
    port: int
    auth: SnmpAuth
    #: Event-loop time by which every request must be answered.
    deadline: float
    #: Configured per-request timeout and retries; backends shrink them near the deadline.
    timeout: float
    retries: int
    max_output_bytes: int
    #: True when the caller cancels the job at `deadline` itself (`JobContext.guarded`): a
    #: backend may then leave out timers of its own for the deadline.
    guarded: bool = False


@dataclass(frozen=True, slots=True)
class WalkResult:
    varbinds: list[Varbind]
    #: True when the walk stopped at `max_varbinds` before the end of its subtrees.
    truncated: bool


@dataclass(frozen=True, slots=True)
class WalkPage:
    """One GETNEXT/GETBULK answer as a backend hands it to `walk_subtree`."""

    status: int  # SNMP error-status (0: none)
    index: int  # error-index (1-based; 0: none)
    #: In answer order: (OID, endOfMibView?, the rendered varbind).
    rows: list[tuple[tuple[int, ...], bool, Varbind]]
    #: The backend saw no error but no rows either for a GETBULK (Net-SNMP folds an
    #: error-status without an index into that): treated like tooBig.
    empty_bulk: bool = False


#: fetch(start OID, max-repetitions, bulk?) → the agent's answer.
WalkFetch = Callable[[tuple[int, ...], int, bool], Awaitable[WalkPage]]
#: `before_page(walk, page number)` of `walk_subtree`: True/False ends the walk, None goes on.
WalkHook = Callable[["SubtreeWalk", int], Awaitable[bool | None]]

_TOO_BIG = 1
_NO_SUCH_NAME = 2


class SubtreeWalk:
    """One subtree walk in progress: where it stands, and what each answer does to it.

    `page()` fetches the next GETBULK/GETNEXT answer through the backend's `fetch` and applies
    it; `apply()` takes rows the backend got some other way (the Net-SNMP backend streams them
    from `snmpbulkwalk`), so a walk can change how it fetches half-way and keep its semantics:
    rows go into `budget` in walk order, `last` is the OID the next page starts from.
    """

    def __init__(
        self,
        fetch: WalkFetch,
        root: str,
        budget: OutputBudget,
        *,
        bulk: bool,
        max_repetitions: int,
        max_varbinds: int,
    ) -> None:
        self.fetch = fetch
        self.root = root
        self.base = parse_oid(root)
        self.last = self.base
        self.budget = budget
        self.bulk = bulk
        self.repetitions = max_repetitions
        self.max_varbinds = max_varbinds

    @property
    def left(self) -> int:
        """Varbinds `max_varbinds` still allows (over all roots: the budget is shared)."""
        return self.max_varbinds - len(self.budget.varbinds)

    async def page(self) -> bool | None:
        """Fetch and apply the next page: True or False when the walk of this subtree is over
        (True: `max_varbinds` cut it short), None when it goes on.

        GETBULK halves max-repetitions on tooBig; SNMPv1's noSuchName ends the walk.
        """
        reps = max(1, min(self.repetitions, self.left + 1))
        page = await self.fetch(self.last, reps, self.bulk)
        if (page.status == _TOO_BIG or page.empty_bulk) and self.bulk and reps > 1:
            self.repetitions = max(1, reps // 2)
            return None
        if page.status == _NO_SUCH_NAME and not self.bulk:
            return False  # SNMPv1 end of the MIB view
        if page.status:
            raise snmp_status_error(
                page.status, page.index, [format_oid(self.last)], self.budget.varbinds
            )
        return self.apply(page.rows)

    def apply(self, rows: Sequence[tuple[tuple[int, ...], bool, Varbind]]) -> bool | None:
        """Apply answer rows that follow `last` in walk order (as `page()` returns).

        Stops at the end of the subtree, at endOfMibView and on an empty answer; raises
        `SnmpError` on a non-increasing OID, with the varbinds gathered so far.
        """
        left = self.left
        step = walk_step(self.base, self.last, [(oid, end) for oid, end, _ in rows])
        for position, (_oid, at) in enumerate(step.accepted):
            if position >= left:
                return True
            self.budget.add(rows[at][2])
        if step.non_increasing:
            raise SnmpError(
                f"agent returned a non-increasing OID after {format_oid(self.last)} "
                f"while walking {self.root}",
                data={"varbinds": list(self.budget.varbinds)},
            )
        if step.next_oid is None:
            return False
        self.last = step.next_oid
        return None


async def walk_subtree(
    fetch: WalkFetch,
    root: str,
    budget: OutputBudget,
    *,
    bulk: bool,
    max_repetitions: int,
    max_varbinds: int,
    before_page: WalkHook | None = None,
) -> bool:
    """Walk one subtree into `budget`; True when `max_varbinds` cut the walk short.

    GETBULK (halving max-repetitions on tooBig) or GETNEXT; stops at the end of the subtree, at
    endOfMibView, at SNMPv1's noSuchName, and raises `SnmpError` on a non-increasing OID.
    `before_page(walk, n)` runs before page `n` and may finish the walk another way (True or
    False, as `SubtreeWalk.page`) or leave it to the page (None).
    """
    walk = SubtreeWalk(
        fetch, root, budget, bulk=bulk, max_repetitions=max_repetitions, max_varbinds=max_varbinds
    )
    for page in range(10_000_000):  # bounded: every round advances or stops
        if before_page is not None:
            done = await before_page(walk, page)
            if done is not None:
                return done
        done = await walk.page()
        if done is not None:
            return done
    return False


async def walk_roots(
    roots: Sequence[str], budget: OutputBudget, walk_root: Callable[[str], Awaitable[bool]]
) -> WalkResult:
    """Walk `roots` in order with a backend's `walk_root` (True: `max_varbinds` reached).

    A `JobError` on the way keeps what was gathered so far as its data.
    """
    try:
        for root in roots:
            if await walk_root(root):
                return WalkResult(budget.varbinds, truncated=True)
    except JobError as exc:
        if exc.data is None:
            exc.data = {"varbinds": list(budget.varbinds)}
        raise
    return WalkResult(budget.varbinds, truncated=False)


class SnmpBackend(Protocol):
    """An SNMP stack. Methods return rendered varbinds or raise a `JobError`.

    Every error carries the varbinds gathered so far in `exc.data`. No method blocks the event
    loop or waits past `target.deadline`; none puts a community or key in a message or a log.
    """

    async def get(self, target: SnmpTarget, oids: Sequence[str]) -> list[Varbind]: ...

    async def getnext(self, target: SnmpTarget, oids: Sequence[str]) -> list[Varbind]: ...

    async def walk(
        self,
        target: SnmpTarget,
        roots: Sequence[str],
        *,
        max_repetitions: int,
        max_varbinds: int,
    ) -> WalkResult: ...

    async def set(self, target: SnmpTarget, varbinds: Sequence[SetValue]) -> list[Varbind]: ...

    async def aclose(self) -> None: ...
