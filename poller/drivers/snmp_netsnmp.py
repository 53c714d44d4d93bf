"""The Net-SNMP backend of the SNMP driver, on ezsnmp 2.x: the only module that imports ezsnmp.

ezsnmp 2.x runs Net-SNMP's own `snmpget`/`snmpgetnext`/`snmpbulkget`/`snmpset` code in-process
from an argument vector: every call parses its options, opens its own Net-SNMP session, sends,
waits, closes, and returns the varbinds as Net-SNMP prints them. The calls block their thread for
the whole request (the GIL is released while Net-SNMP waits), so they run in a bounded thread
pool and never on the event loop. There is no session object to share between threads or jobs:
what a "cached session" would hold here is the argument vector, which is immutable and cached per
credential identity (with the SNMPv3 master keys, computed once).

What is shared is Net-SNMP's process-wide state, and this module is written around it:

- Output options are globals that each call sets and clears again, so a concurrent call may
  print an OID as `iso.3.6.1...` instead of `.1.3.6.1...`: `_numeric_oid` reads both. OCTET
  STRINGs always print in hex (`-Ox` sets the format and nothing clears it), so bytes are exact.
- `-Cf` (do not "fix" a PDU after an error-status) is a process-wide toggle: it is flipped once,
  when the process first uses ezsnmp, and never passed again (see `_prepare_process`).
- Net-SNMP's SNMPv3 user table keeps one key set per (engine ID, user name) and ignores the keys
  of later requests. `_UsmGate` lets requests of one user name run together only while they use
  the same keys; other keys wait until the table is quiet, the user is removed from it, and the
  new keys take its place. The first request of a new identity (it discovers the agent's engine
  ID and adds the user to the table) runs one at a time.
- Net-SNMP reads `/etc/snmp`, MIB directories and a persistent-state directory when it starts,
  and state written there by one process can break SNMPv3 discovery in the next. The first use
  points `SNMPCONFPATH`, `SNMP_PERSISTENT_DIR`, `MIBDIRS` at a private empty directory and loads
  no MIB, so the output is numeric and nothing persists between runs. The directory is the
  process's own under `<tmp>/usm-netsnmp.<uid>/`, locked while the process lives; those of
  killed processes are removed by the next one (`_private_directory`).
- ezsnmp leaks a log handler and (v1/v2c) a copy of the community on every call. The handlers
  are freed through Net-SNMP itself every `TRIM_EVERY` requests, and Net-SNMP's default
  community is kept at the community in use so that requests can leave `-c` out (`_Native`,
  `_DefaultCommunity`).

Plain SNMPv1/v2c GETs do not go through ezsnmp: they are sent on Net-SNMP sessions kept open per
pool thread (`poller.drivers.snmp_netsnmp_open`, another copy of libnetsnmp with its own state),
and their varbinds are read out of the response PDU and rendered by `_render_raw` exactly as
`_decode` renders ezsnmp's printed ones. Whatever that path cannot promise to answer the same
(other types, odd error statuses, a send error) it hands back, and the request runs through
ezsnmp as before (`_run_sync`).

A call that outlives its job's deadline is abandoned by the event loop (the runner's timeout
cancels the await) and finishes on its own thread, bounded by the per-request timeout and
retries; it keeps its `_UsmGate` slot until then, so it cannot be pulled out from under it.

Walks start page by page like that, and a subtree that is still going after
`program_after_pages` pages is handed to Net-SNMP's `snmpbulkwalk` (`snmpwalk` on SNMPv1) as a
child process (`poller.drivers.snmp_netsnmp_walk`): one session for the whole subtree instead of
one program run per page. Its printed rows go through the same decoding and the same
`SubtreeWalk` as the pages, and whatever the program cannot finish (an error-status, an
unexpected failure) is handed back to the page-by-page walk from the last OID it delivered.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import fcntl
import functools
import hashlib
import ipaddress
import itertools
import os
import re
import resource
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import ezsnmp
from ezsnmp import netsnmp as ezsnmp_calls
from ezsnmp import sessionbase as ezsnmp_base
from pydantic import SecretStr

from poller.drivers import snmp_netsnmp_open
from poller.drivers.pool import CallPool
from poller.drivers.snmp_base import (
    ERROR_STATUS_NAMES,
    OutputBudget,
    SetValue,
    SmiType,
    SnmpTarget,
    SubtreeWalk,
    Varbind,
    WalkPage,
    WalkResult,
    format_oid,
    no_response_error,
    parse_oid,
    plan_timeout,
    render_varbind,
    snmp_status_error,
    walk_roots,
    walk_subtree,
)
from poller.drivers.snmp_netsnmp_open import OpenSessions, RawVarbind
from poller.drivers.snmp_netsnmp_walk import (
    Row,
    WalkChild,
    WalkPrograms,
    WalkStalledError,
    walk_argv,
)
from poller.errors import (
    DeviceAuthError,
    DeviceTimeoutError,
    DeviceUnreachableError,
    JobError,
    SnmpError,
)
from poller.wire import SnmpAuth

__all__ = ["NetsnmpBackend"]

#: Most OIDs sent in one GET/GETNEXT PDU; longer lists are split (and halved again on tooBig).
MAX_OIDS_PER_PDU = 64
_TOO_BIG = 1

_AUTH_NAMES = {
    "MD5": "MD5",
    "SHA": "SHA",
    "SHA224": "SHA-224",
    "SHA256": "SHA-256",
    "SHA384": "SHA-384",
    "SHA512": "SHA-512",
}
_AUTH_HASHES = {
    "MD5": "md5",
    "SHA": "sha1",
    "SHA224": "sha224",
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA512": "sha512",
}
_PRIV_NAMES = {"DES": "DES", "AES": "AES", "AES192": "AES-192", "AES256": "AES-256"}
#: Defaults when a job gives a key but no protocol: the defaults of Net-SNMP and pysnmp.
_DEFAULT_AUTH = "MD5"
_DEFAULT_PRIV = "DES"
#: RFC 3414 A.2: a pass phrase becomes a master key by hashing 1 MiB of its repetitions.
_KU_LENGTH = 1_048_576

#: Net-SNMP's reason texts for SNMPv3 failures → the same messages as the pysnmp backend.
_AUTH_FAILURES: tuple[tuple[str, str], ...] = (
    ("unknown user name", "the agent does not know this SNMPv3 user (usmStatsUnknownUserNames)"),
    ("authentication failure", "wrong SNMPv3 auth key or auth protocol (usmStatsWrongDigests)"),
    ("decryption error", "wrong SNMPv3 priv key or priv protocol (usmStatsDecryptionErrors)"),
    (
        "unsupported security level",
        "the agent does not allow this security level for this user (usmStatsUnsupportedSecLevels)",
    ),
    ("not in time window", "SNMPv3 time window not synchronised (usmStatsNotInTimeWindows)"),
)

#: Net-SNMP's printed type names → SMI names (see `_decode` for the values).
_SMI_BY_NETSNMP: dict[str, SmiType] = {
    "INTEGER": "Integer",
    "STRING": "OctetString",
    "Hex-STRING": "OctetString",
    '""': "OctetString",
    "OID": "ObjectIdentifier",
    "IpAddress": "IpAddress",
    "Network Address": "IpAddress",
    "Counter32": "Counter32",
    "Gauge32": "Gauge32",
    "UInteger32": "Gauge32",
    "Timeticks": "TimeTicks",
    "Opaque": "Opaque",
    "OPAQUE": "Opaque",
    "Counter64": "Counter64",
    "NULL": "Null",
    "NOSUCHOBJECT": "noSuchObject",
    "NOSUCHINSTANCE": "noSuchInstance",
}
_END_OF_MIB_VIEW = "No more variables left in this MIB View"
#: Values after which `snmpbulkwalk` stops (as at endOfMibView) where the page walk goes on.
_STOPS_THE_PROGRAM = frozenset({"noSuchObject", "noSuchInstance"})

#: `snmpset` type letters; Counter32, Counter64 and Opaque have none (see docs/drivers/snmp.md).
_SET_LETTERS = {
    "Integer": "i",
    "Gauge32": "u",
    "Unsigned32": "u",
    "TimeTicks": "t",
    "IpAddress": "a",
    "ObjectIdentifier": "o",
}

# Net-SNMP's Opaque special types (draft-perkins-opaque), re-encoded from their printed value.
_OPAQUE_FLOAT = re.compile(r"^(Float|Double):\s*(\S+)$")
_OPAQUE_INT = re.compile(r"^(I64|Int64|U64|UInt64|Counter64):\s*(-?\d+)$")
_OPAQUE_TAGS = {"I64": 0x7A, "Int64": 0x7A, "U64": 0x7B, "UInt64": 0x7B, "Counter64": 0x76}
_TIMETICKS = re.compile(r"^\((\d+)\)")
_ENUM = re.compile(r"\((-?\d+)\)$")
_REASON = re.compile(r"Reason:\s*\(?([A-Za-z]+)")
_FAILED = re.compile(r"Failed object:\s*(\S+)")

_CallKind = Literal["get", "next", "bulk", "set"]
_Row = Row  # (oid, Net-SNMP type, printed value)

#: Net-SNMP sessions each pool thread keeps open for plain v1/v2c GETs (0: every request through
#: ezsnmp); `USM_POLLER_SNMP_OPEN_SESSIONS`, see `poller.drivers.snmp_netsnmp_open`.
OPEN_SESSIONS = 8

#: Pages of a subtree walked in-process before the rest goes to `snmpbulkwalk`: starting the
#: program costs ~5 ms of CPU and ~10 ms in all, a page in-process ~1-3 ms, so short walks
#: (most of them) stay in-process and long ones pay the start once.
PROGRAM_AFTER_PAGES = 4


# --------------------------------------------------------------------------------------------
# Process-wide Net-SNMP set-up


class _Process:
    """Net-SNMP's state is per process, and so are its set-up and the SNMPv3 gate."""

    lock = threading.Lock()
    gate: _UsmGate | None = None
    #: This process's private directory (SNMPCONFPATH...), and the descriptor that locks it.
    private: str | None = None
    private_lock: int | None = None
    native: _Native | None = None
    community: _DefaultCommunity
    calls = itertools.count(1)
    trimming = threading.Lock()


def _prepare_process() -> _UsmGate:
    """Isolate Net-SNMP's configuration and turn PDU fixing off, once; the process's gate."""
    with _Process.lock:
        if _Process.gate is not None:
            return _Process.gate
        private, lock = _private_directory(tempfile.gettempdir())
        atexit.register(_remove_private, private, lock)
        _Process.private, _Process.private_lock = private, lock
        os.environ["SNMPCONFPATH"] = private
        os.environ["SNMP_PERSISTENT_DIR"] = private
        os.environ["MIBDIRS"] = private
        os.environ["MIBS"] = ""
        # The first call initialises Net-SNMP; its `-Cf` flips "do not fix PDUs" on for good
        # (it is a process-wide toggle that nothing resets). No object name: nothing is sent.
        with suppress(ezsnmp.GenericError):
            ezsnmp_calls.snmpget(["-Cf", "-v", "2c", "-c", "-", "udp:127.0.0.1:9"])
        native = _Native.load()
        _Process.native = native
        _Process.community = _DefaultCommunity(
            native.set_default_community if native is not None else None
        )
        _Process.gate = _UsmGate(functools.partial(_purge_user, f"unix:{private}/no-agent"))
        return _Process.gate


def _purge_user(address: str, user: str) -> None:
    """Remove every entry of SNMPv3 user `user` from Net-SNMP's user table.

    ezsnmp's own `SessionBase` does exactly this around each of its SNMPv3 operations; here the
    operation goes to a Unix socket that does not exist, so nothing is sent. The raw SWIG
    object is used because its destructor does not shut Net-SNMP down.
    """
    base = ezsnmp_base.SessionBase(
        address,
        "",
        "3",
        "",
        "",
        "",
        "",
        "",
        "noAuthNoPriv",
        "",
        user,
        "",
        "",
        "",
        "0",
        "1",
        "",
        "",
        False,
        False,
        True,
        False,
        True,
        "",
    )
    held = _Process.community.hold()  # its session reads the default community too
    try:
        base.get(["1.3.6.1.2.1.1.3.0"])
    except Exception as exc:  # the SWIG class is not importable: ezsnmp matches it by name too
        if type(exc).__name__ != "ConnectionErrorBase":
            raise
    finally:
        _Process.community.leave(held)


# --------------------------------------------------------------------------------------------
# The private directory


#: `<temp>/usm-netsnmp.<uid>/`: one directory per process under it (`_private_directory`).
#: The dot keeps it apart from the `usm-netsnmp-XXXXXXXX` directories of earlier versions.
_PARENT_NAME = "usm-netsnmp.{uid}"


def _private_directory(base: str) -> tuple[str, int | None]:
    """A new private directory for this process's Net-SNMP configuration and state, and the
    descriptor that locks it (keep it open until the directory is removed: `_remove_private`).

    It is `<base>/usm-netsnmp.<uid>/<pid>-<random>`, mode 0700, and stays locked (`flock`) for
    as long as this process lives, whatever ends it. Directories under the same parent that
    nobody holds are left over from processes that were killed: they are removed here first.
    The lock, not the PID, says whether a process still lives: PIDs are reused, and one PID
    number can be two processes in two PID namespaces that share `/tmp`.

    The parent must be a real directory of ours (not a symbolic link, not another user's);
    if it is not (another user made it first), the directory is a one-off `mkdtemp` in `base`
    as before, with no lock (None), and only `_remove_private` at exit removes it.
    """
    parent = os.path.join(base, _PARENT_NAME.format(uid=os.getuid()))
    try:
        parent_fd = _own_directory(parent)
    except OSError:
        return tempfile.mkdtemp(prefix="usm-netsnmp-", dir=base), None
    try:
        _remove_abandoned(parent_fd)
        for _ in range(100):  # bounded: another process removes it only if it starts as we do
            private = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent)
            try:
                lock = _lock_directory(private)
            except OSError:  # no flock on this file system
                shutil.rmtree(private, ignore_errors=True)
                break
            if lock is not None:
                return private, lock
    finally:
        os.close(parent_fd)
    return tempfile.mkdtemp(prefix="usm-netsnmp-", dir=base), None


def _own_directory(path: str) -> int:
    """An open descriptor of directory `path` (made if missing), which must be ours and 0700."""
    with suppress(FileExistsError):
        os.mkdir(path, 0o700)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)  # a symbolic link: ELOOP
    st = os.fstat(fd)
    ours = st.st_uid == os.getuid()
    if ours and stat.S_IMODE(st.st_mode) != 0o700:
        try:
            os.fchmod(fd, 0o700)
        except OSError:
            ours = False
    if not ours:
        os.close(fd)
        raise PermissionError(f"{path} is not a private directory of uid {os.getuid()}")
    return fd


def _lock_directory(path: str) -> int | None:
    """Lock our new directory `path` for this process's life: its descriptor, or None if a
    process sweeping the parent took it first (it removes it: make another). OSError if the
    file system has no `flock`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None  # removed already
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        if st.st_nlink and os.lstat(path).st_ino == st.st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass  # being removed, or removed
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _remove_abandoned(parent_fd: int) -> None:
    """Remove the directories under the parent that no living process holds."""
    with os.scandir(parent_fd) as entries:
        names = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError:
            continue  # gone already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: its process lives
            os.close(fd)
            continue
        try:
            shutil.rmtree(name, dir_fd=parent_fd, ignore_errors=True)
        finally:
            os.close(fd)


def _remove_private(path: str, lock: int | None) -> None:
    """Remove our private directory (at exit), then let go of its lock."""
    shutil.rmtree(path, ignore_errors=True)
    if lock is not None:
        os.close(lock)


# --------------------------------------------------------------------------------------------
# ezsnmp's per-call leaks, undone through libnetsnmp itself

#: Net-SNMP constants (default_store.h, snmp_logging.h), the same from 5.7 to 5.10.
_DS_LIBRARY_ID = 0
_DS_LIB_COMMUNITY = 7
_LOGHANDLER_NONE = 6
_LOG_DEBUG = 7
#: Newest log handlers always left in Net-SNMP's list (new ones are linked in before them).
_KEEP_HANDLERS = 8
#: Requests between two trims of the log handler list: at most ~80 KB of handlers meanwhile.
TRIM_EVERY = 1024


class _LogHandler(ctypes.Structure):
    """Net-SNMP's `struct netsnmp_log_handler_s` (snmp_logging.h, unchanged from 5.7 to 5.10)."""

    _fields_ = (
        ("enabled", ctypes.c_int),
        ("priority", ctypes.c_int),
        ("pri_max", ctypes.c_int),
        ("type", ctypes.c_int),
        ("token", ctypes.c_void_p),
        ("handler", ctypes.c_void_p),
        ("imagic", ctypes.c_int),
        ("magic", ctypes.c_void_p),
        ("next", ctypes.c_void_p),
        ("prev", ctypes.c_void_p),
    )


class _Native:
    """The libnetsnmp that ezsnmp loaded, through ctypes: what undoes ezsnmp's per-call leaks.

    Every ezsnmp 2.5 call (valgrind on a bare loop of `ezsnmp.netsnmp.snmpget`) leaves behind:

    - a 64-byte log handler: each call registers a new "no logging" handler
      (`netsnmp_register_loghandler(NETSNMP_LOGHANDLER_NONE, 0)`) and nothing removes it.
      `trim_log_handlers` frees all but the newest few, every `TRIM_EVERY` requests.
    - the community of a v1/v2c request: `snmp_parse_args` copies `-c`'s value (`strdup`, to
      zero the argument) and the copy is never freed. A request that has no `-c` uses Net-SNMP's
      default community (`defCommunity`) instead, which is not copied: `_DefaultCommunity` sets
      that to the community in use so that requests can leave `-c` out.

    `load` returns None when ezsnmp's library does not have the symbols this needs; then
    requests run exactly as ezsnmp runs them, leaks included.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._set_string = lib.netsnmp_ds_set_string
        self._set_string.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_char_p)
        self._set_string.restype = ctypes.c_int
        self._head = lib.get_logh_head
        self._head.argtypes = ()
        self._head.restype = ctypes.c_void_p
        self._remove = lib.netsnmp_remove_loghandler
        self._remove.argtypes = (ctypes.c_void_p,)
        self._remove.restype = ctypes.c_int
        self._null = ctypes.cast(lib.log_handler_null, ctypes.c_void_p).value
        # Its "index" into the list by priority: since 5.10 no longer exported.
        try:
            self._priorities: ctypes.Array[ctypes.c_void_p] | None = (
                ctypes.c_void_p * (_LOG_DEBUG + 1)
            ).in_dll(lib, "logh_priorities")
        except ValueError:
            self._priorities = None

    @classmethod
    def load(cls) -> _Native | None:
        """ezsnmp's own libnetsnmp (already loaded: nothing new is loaded), or None."""
        try:
            from ezsnmp import _netsnmpbase  # noqa: PLC0415 - the extension that links it

            # Symbols looked up through the extension resolve to the libnetsnmp it links. PyDLL:
            # the calls are short and never block, so they keep the GIL (no hand-over per call).
            lib = ctypes.PyDLL(_netsnmpbase.__file__, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
            return cls(lib)
        except (ImportError, OSError, AttributeError, ValueError):
            return None

    def set_default_community(self, community: bytes | None) -> None:
        """Net-SNMP's `defCommunity` (None: unset). Only while no request can read it."""
        self._set_string(_DS_LIBRARY_ID, _DS_LIB_COMMUNITY, community)

    def trim_log_handlers(self) -> int:
        """Free ezsnmp's "no logging" handlers but the newest `_KEEP_HANDLERS`; how many.

        Safe while requests run: ezsnmp links each new handler in at the head of the list
        (they all have priority 0) and touches nothing else; only handlers further down are
        unlinked and freed, by Net-SNMP's own `netsnmp_remove_loghandler`. Nothing reads those
        but a message logged at LOG_EMERG (client code logs them only while parsing MIB files,
        and no MIB is loaded) or code that changes the logging set-up (none runs here). A
        handler that is not exactly one of ezsnmp's (enabled, priority 0, no maximum, type
        NONE, `log_handler_null`, no token or data), or that the priority index points at, is
        left where it is. ~1 microsecond per handler (ctypes).
        """
        node = self._head()
        for _ in range(_KEEP_HANDLERS):
            if not node:
                return 0
            node = _LogHandler.from_address(node).next
        if not node:
            return 0
        indexed = {p for p in self._priorities if p} if self._priorities is not None else set()
        handler_at, remove, null = _LogHandler.from_address, self._remove, self._null
        freed = 0
        node = handler_at(node).next
        while node:
            handler = handler_at(node)
            after = handler.next
            if (
                handler.handler == null
                and handler.type == _LOGHANDLER_NONE
                and handler.enabled == 1
                and not (handler.priority or handler.pri_max or handler.token or handler.magic)
                and node not in indexed
            ):
                remove(node)
                freed += 1
            node = after
        return freed

    def handlers(self) -> int:
        """How many log handlers Net-SNMP has (for tests and diagnostics)."""
        count, node = 0, self._head()
        while node:
            count += 1
            node = _LogHandler.from_address(node).next
        return count


def _after_call() -> None:
    """Every `TRIM_EVERY` requests, one pool thread trims the log handler list."""
    native = _Process.native
    if native is None or next(_Process.calls) % TRIM_EVERY:
        return
    if _Process.trimming.acquire(blocking=False):
        try:
            native.trim_log_handlers()
        finally:
            _Process.trimming.release()


@dataclass(frozen=True, slots=True)
class _Held:
    """What `_DefaultCommunity.enter` gave a request: a hold on the setting, and whether the
    setting is the request's community (it leaves `-c` out)."""

    hold: bool
    omit: bool


_NOT_HELD = _Held(hold=False, omit=False)
_HELD = _Held(hold=True, omit=False)
_HELD_OMIT = _Held(hold=True, omit=True)


class _DefaultCommunity:
    """Net-SNMP's default community (`defCommunity`), kept at a community in use so that v1/v2c
    requests with that community can leave `-c` out (and do not leak a copy of it).

    Net-SNMP reads the setting without copying it (a pointer into its own storage) from the
    start of a request until its session is open: in a v1/v2c request without `-c`, and in every
    session whose community is empty, which includes every SNMPv3 session. Changing the setting
    frees the old text, so it changes only while no such request runs (`held` is 0): a request
    with another community then takes it over; while others hold it, a request with another
    community passes `-c` as before. A request with an empty community needs the setting unset
    (`-c ""` would take the default): it waits for the holders to finish, and SNMPv3 requests
    wait with it, never past their deadline.

    Disabled (every request passes `-c`) when `set_value` is None.
    """

    __slots__ = ("cond", "held", "lock", "set_value", "unsetting", "value")

    def __init__(self, set_value: Callable[[bytes | None], None] | None) -> None:
        self.set_value = set_value
        self.lock = threading.Lock()  # taken directly on the fast path: no Python-level call
        self.cond = threading.Condition(self.lock)
        self.value: bytes | None = None  # None: unset, as Net-SNMP starts
        self.held = 0
        self.unsetting = 0  # requests with an empty community waiting for the holders

    def enter(self, ident: _Identity, deadline: float) -> _Held:
        """Before a request with these credentials. Pair it with `leave`."""
        if self.set_value is None:
            return _NOT_HELD
        if ident.community is None:  # SNMPv3
            return self._enter_any(deadline)
        wanted = ident.c_community
        if not wanted:  # empty; None: ezsnmp refuses it before Net-SNMP reads anything
            return _NOT_HELD if wanted is None else self._enter_unset(deadline)
        with self.lock:
            if self.unsetting or (self.value != wanted and self.held):
                return _NOT_HELD
            if self.value != wanted:
                self._set(wanted)
            self.held += 1
        return _HELD_OMIT

    def _enter_any(self, deadline: float) -> _Held:
        with self.cond:
            if self.unsetting:
                self._wait(lambda: not self.unsetting, deadline)
            self.held += 1
        return _HELD

    def _enter_unset(self, deadline: float) -> _Held:
        with self.cond:
            self.unsetting += 1
            try:
                self._wait(lambda: self.value is None or not self.held, deadline)
                if self.value is not None:
                    self._set(None)
                self.held += 1
            finally:
                self.unsetting -= 1
                self.cond.notify_all()
        return _HELD

    def hold(self) -> _Held:
        """`enter` for an SNMPv3 session that must not wait (the gate's purge)."""
        if self.set_value is None:
            return _NOT_HELD
        with self.lock:
            self.held += 1
        return _HELD

    def leave(self, held: _Held) -> None:
        if held.hold:
            with self.lock:
                self.held -= 1
                if not self.held and self.unsetting:
                    self.cond.notify_all()

    def _set(self, value: bytes | None) -> None:
        assert self.set_value is not None
        self.set_value(value)
        self.value = value

    def _wait(self, predicate: Callable[[], bool], deadline: float) -> None:
        if not self.cond.wait_for(predicate, timeout=_left(deadline)):
            raise DeviceTimeoutError(
                "waited until the job deadline for requests with another community to finish"
            )


def _c_string(text: str) -> bytes | None:
    """`text` as the C string Net-SNMP gets from ezsnmp (up to a NUL), None if there is none."""
    try:
        return text.encode().partition(b"\0")[0]
    except UnicodeEncodeError:  # ezsnmp refuses it before Net-SNMP sees anything
        return None


# --------------------------------------------------------------------------------------------
# Credentials


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


@functools.lru_cache(maxsize=1024)
def _master_key(hash_name: str, passphrase: str) -> str:
    """RFC 3414 password-to-key (Ku) in hex; Net-SNMP localises it per engine itself."""
    raw = passphrase.encode()
    digest = hashlib.new(hash_name)
    digest.update((raw * (_KU_LENGTH // len(raw) + 1))[:_KU_LENGTH])
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class _Identity:
    """The credential part of the argument vector, and what the USM gate needs to know.

    `community` (v1/v2c) is not in `args`: `_Call.argv` adds `-c` unless Net-SNMP's default
    community is this one (see `_DefaultCommunity`).
    """

    args: tuple[str, ...]
    user: str = ""
    fingerprint: str = ""
    secrets: tuple[str, ...] = ()
    community: str | None = None
    c_community: bytes | None = None  # `community` as Net-SNMP sees it (`_c_string`)
    version: str = ""  # "1" or "2c" for a community; "" for SNMPv3


#: v1/v2c identities by (version, community): one dict lookup per request, where a lookup by
#: the `SnmpAuth` itself hashes and compares the whole pydantic model (~1.4 us a request).
_COMMUNITY_IDENTITIES: dict[tuple[str, str], _Identity] = {}
_MAX_COMMUNITY_IDENTITIES = 4096


def _identity(auth: SnmpAuth) -> _Identity:
    """The request's `_Identity`: cached by version and community (v1/v2c), else by `auth`."""
    if auth.version == "3":
        return _v3_identity(auth)
    key = (auth.version, _secret(auth.community))
    ident = _COMMUNITY_IDENTITIES.get(key)
    if ident is None:
        if len(_COMMUNITY_IDENTITIES) >= _MAX_COMMUNITY_IDENTITIES:
            _COMMUNITY_IDENTITIES.clear()  # bounded; whoever comes next is cached again
        ident = _COMMUNITY_IDENTITIES[key] = _community_identity(*key)
    return ident


def _community_identity(version: str, community: str) -> _Identity:
    return _Identity(
        ("-v", version),
        secrets=(community,),
        community=community,
        c_community=_c_string(community),
        version=version,
    )


@functools.lru_cache(maxsize=4096)
def _v3_identity(auth: SnmpAuth) -> _Identity:
    level = auth.effective_security_level
    args = ["-v", "3", "-u", auth.user or "", "-l", level]
    secrets: list[str] = []
    if level in ("authNoPriv", "authPriv"):
        proto = auth.auth_protocol or _DEFAULT_AUTH
        key = _secret(auth.auth_key)
        args += ["-a", _AUTH_NAMES[proto], "-3m", _master_key(_AUTH_HASHES[proto], key)]
        secrets.append(key)
        if level == "authPriv":
            priv = auth.priv_protocol or _DEFAULT_PRIV
            priv_key = _secret(auth.priv_key)
            args += ["-x", _PRIV_NAMES[priv], "-3M", _master_key(_AUTH_HASHES[proto], priv_key)]
            secrets.append(priv_key)
    if auth.context:
        args += ["-n", auth.context]
    fingerprint = hashlib.sha256("\0".join(args).encode()).hexdigest()
    return _Identity(tuple(args), auth.user or "", fingerprint, tuple(secrets))


def _conf_string(text: str) -> str | None:
    """`text` as a quoted snmp.conf value; None if a line of the file cannot hold it."""
    if any(c in text for c in "\0\r\n"):
        return None
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@functools.lru_cache(maxsize=4096)
def _walk_conf(auth: SnmpAuth) -> str | None:
    """The `snmp.conf` of a walk program for these credentials (see snmp.conf(5)).

    The same settings as `_identity`'s options, SNMPv3 keys as RFC 3414 master keys. None when a
    community, user or context cannot be written in the file (a line break or NUL in it): such
    walks stay in-process.
    """
    lines = ["dontLoadHostConfig true"]
    if auth.version in ("1", "2c"):
        community = _conf_string(_secret(auth.community))
        if community is None:
            return None
        lines += [f"defVersion {auth.version}", f"defCommunity {community}"]
        return "\n".join(lines) + "\n"
    user, context = _conf_string(auth.user or ""), _conf_string(auth.context)
    if user is None or context is None:
        return None
    level = auth.effective_security_level
    lines += ["defVersion 3", f"defSecurityName {user}", f"defSecurityLevel {level}"]
    if level in ("authNoPriv", "authPriv"):
        proto = auth.auth_protocol or _DEFAULT_AUTH
        key = _master_key(_AUTH_HASHES[proto], _secret(auth.auth_key))
        lines += [f"defAuthType {_AUTH_NAMES[proto]}", f"defAuthMasterKey 0x{key}"]
        if level == "authPriv":
            priv = auth.priv_protocol or _DEFAULT_PRIV
            priv_key = _master_key(_AUTH_HASHES[proto], _secret(auth.priv_key))
            lines += [f"defPrivType {_PRIV_NAMES[priv]}", f"defPrivMasterKey 0x{priv_key}"]
    if auth.context:
        lines.append(f"defContext {context}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The SNMPv3 user-table gate


@dataclass(slots=True)
class _Ticket:
    """One request's slot in the gate; `ok` is set when the agent answered."""

    new: bool
    ok: bool = False


@dataclass(slots=True)
class _UsmGate:
    """Serialises changes to Net-SNMP's SNMPv3 user table against the requests that use it.

    Requests whose user name is in the table with the same keys share it. A request with other
    keys for that name waits until no SNMPv3 request is running, removes the name from the table
    and then runs. The first request of a (device, user, keys) identity runs alone among first
    requests (engine-ID discovery adds to the table). All waits end at the job's deadline.
    """

    purge: Callable[[str], None]
    cond: threading.Condition = field(default_factory=threading.Condition)
    discovery: threading.Lock = field(default_factory=threading.Lock)
    readers: int = 0
    purging: int = 0
    keys: dict[str, str] = field(default_factory=dict)
    known: set[tuple[str, int, str, str]] = field(default_factory=set)

    @contextmanager
    def use(self, device: tuple[str, int], ident: _Identity, deadline: float) -> Iterator[_Ticket]:
        key = (device[0], device[1], ident.user, ident.fingerprint)
        with self.cond:
            self._enter(ident, deadline)
            ticket = _Ticket(new=key not in self.known)
        try:
            if ticket.new and not self.discovery.acquire(timeout=_left(deadline)):
                raise _deadline_error(device)
            try:
                yield ticket
            finally:
                if ticket.new:
                    self.discovery.release()
        finally:
            with self.cond:
                self.readers -= 1
                if ticket.ok and self.keys.get(ident.user) == ident.fingerprint:
                    self.known.add(key)
                self.cond.notify_all()

    def _enter(self, ident: _Identity, deadline: float) -> None:
        """Take a reader slot (the condition is held), purging the user name first if needed."""
        for _ in range(1_000_000):  # bounded: every round waits or finishes
            current = self.keys.get(ident.user)
            if current is not None and current != ident.fingerprint:
                self.purging += 1
                try:
                    self._wait(lambda: self.readers == 0, deadline)
                    if self.keys.get(ident.user) not in (None, ident.fingerprint):
                        self.purge(ident.user)
                        self.keys.pop(ident.user, None)
                        self.known = {k for k in self.known if k[2] != ident.user}
                finally:
                    self.purging -= 1
                    self.cond.notify_all()
                continue
            if self.purging:
                self._wait(lambda: self.purging == 0, deadline)
                continue
            self.keys[ident.user] = ident.fingerprint
            self.readers += 1
            return
        raise RuntimeError("SNMPv3 gate did not settle")

    def _wait(self, predicate: Callable[[], bool], deadline: float) -> None:
        if not self.cond.wait_for(predicate, timeout=_left(deadline)):
            raise DeviceTimeoutError(
                "waited until the job deadline for other SNMPv3 requests to change keys"
            )


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _deadline_error(device: tuple[str, int]) -> DeviceTimeoutError:
    return DeviceTimeoutError(f"no SNMP response from {device[0]}:{device[1]} before the deadline")


# --------------------------------------------------------------------------------------------
# Decoding Net-SNMP's printed varbinds


_ROOT_NAMES = {"ccitt": "0", "iso": "1", "joint-iso-ccitt": "2"}


_PLAIN_OID = re.compile(r"\.?(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+")


def _numeric_oid(printed: str) -> str:
    """`.1.3.6.1.2`, `iso.3.6.1.2` or `.iso.3.6.1.2` → `1.3.6.1.2`.

    The symbolic forms appear when a concurrent call changed Net-SNMP's output options (no MIB
    is loaded, so only the roots have names).
    """
    if _PLAIN_OID.fullmatch(printed):  # what Net-SNMP prints with -On: no parsing needed
        return printed.removeprefix(".")
    if printed.startswith("iso.") and _PLAIN_OID.fullmatch(printed, 4):
        return "1." + printed[4:]  # the same text as parsed below, without parsing it
    first, _, rest = printed.strip().removeprefix(".").partition(".")
    text = f"{_ROOT_NAMES.get(first, first)}.{rest}" if rest else _ROOT_NAMES.get(first, first)
    try:
        return format_oid(parse_oid(text))
    except ValueError:
        raise SnmpError(f"Net-SNMP printed an OID that is not numeric: {printed!r}") from None


def _opaque_bytes(value: str) -> bytes:
    """The BER content of an Opaque, rebuilt from Net-SNMP's printed form."""
    match = _OPAQUE_FLOAT.match(value)
    if match:
        if match[1] == "Float":
            return b"\x9f\x78\x04" + struct.pack(">f", float(match[2]))
        return b"\x9f\x79\x08" + struct.pack(">d", float(match[2]))
    match = _OPAQUE_INT.match(value)
    if match:
        number = int(match[2])
        size = max(1, (number.bit_length() + 8) // 8)
        signed = match[1] in ("I64", "Int64")
        body = number.to_bytes(size, "big", signed=signed or number < 0)
        if not signed and body[0] & 0x80:
            body = b"\x00" + body
        return bytes([0x9F, _OPAQUE_TAGS[match[1]], len(body)]) + body
    return bytes.fromhex("".join(value.split()))


def _decode(row: _Row) -> tuple[Varbind, bool]:
    """One printed varbind → the rendered varbind, and whether it is endOfMibView."""
    printed_oid, kind, value = row
    return _decode_at(_numeric_oid(printed_oid), kind, value)


def _decode_numbered(row: _Row) -> tuple[tuple[int, ...], Varbind, bool]:
    """`_decode` for a walk program's rows, with the OID as numbers too (parsed once)."""
    printed_oid, kind, value = row
    if printed_oid.startswith("."):  # -On in a process of its own: always ".1.3.6..."
        text = printed_oid[1:]
        try:
            oid = tuple(map(int, text.split(".")))
        except ValueError:
            pass
        else:
            return (oid, *_decode_at(text, kind, value))
    varbind, end = _decode(row)
    return parse_oid(str(varbind["oid"])), varbind, end


def _decode_at(oid: str, kind: str, value: str) -> tuple[Varbind, bool]:
    if kind.startswith(_END_OF_MIB_VIEW):
        return render_varbind(oid, "endOfMibView", None), True
    smi = _SMI_BY_NETSNMP.get(kind)
    if smi is None:
        raise SnmpError(f"agent returned a value of an unsupported SMI type at {oid} ({kind})")
    try:
        return _render(oid, smi, kind, value), False
    except ValueError:
        raise SnmpError(f"cannot read Net-SNMP's {kind} value at {oid}") from None


def _octets(kind: str, value: str) -> bytes:
    return bytes.fromhex("".join(value.split())) if kind == "Hex-STRING" else value.encode()


def _ticks(_kind: str, value: str) -> int:
    match = _TIMETICKS.match(value)  # "(429) 0:00:04.29"
    return int(match[1] if match else value)


def _integer(_kind: str, value: str) -> int:
    match = _ENUM.search(value)  # "up(1)" when a MIB names the value
    return int(match[1] if match else value)


def _unsigned(_kind: str, value: str) -> int:
    return int(value)


def _object_id(_kind: str, value: str) -> str:
    return _numeric_oid(value)


def _ip_address(_kind: str, value: str) -> str | bytes:
    # SNMPv1 NetworkAddress prints as 7F:00:00:01.
    return bytes.fromhex(value.replace(":", "")) if ":" in value else value


def _opaque(_kind: str, value: str) -> bytes:
    return _opaque_bytes(value)


def _no_value(_kind: str, _value: str) -> None:
    return None


_VALUES: dict[str, Callable[[str, str], int | bytes | str | None]] = {
    "OctetString": _octets,
    "TimeTicks": _ticks,
    "Integer": _integer,
    "Counter32": _unsigned,
    "Gauge32": _unsigned,
    "Counter64": _unsigned,
    "ObjectIdentifier": _object_id,
    "IpAddress": _ip_address,
    "Opaque": _opaque,
}


def _render(oid: str, smi: SmiType, kind: str, value: str) -> Varbind:
    return render_varbind(oid, smi, _VALUES.get(smi, _no_value)(kind, value))


_SMI_BY_TAG: dict[int, SmiType] = {
    snmp_netsnmp_open.TAG_INTEGER: "Integer",
    snmp_netsnmp_open.TAG_OCTET_STRING: "OctetString",
    snmp_netsnmp_open.TAG_NULL: "Null",
    snmp_netsnmp_open.TAG_OID: "ObjectIdentifier",
    snmp_netsnmp_open.TAG_IPADDRESS: "IpAddress",
    snmp_netsnmp_open.TAG_COUNTER32: "Counter32",
    snmp_netsnmp_open.TAG_GAUGE32: "Gauge32",
    snmp_netsnmp_open.TAG_TIMETICKS: "TimeTicks",
    snmp_netsnmp_open.TAG_OPAQUE: "Opaque",
    snmp_netsnmp_open.TAG_COUNTER64: "Counter64",
    snmp_netsnmp_open.TAG_OPAQUE_FLOAT: "Opaque",
    snmp_netsnmp_open.TAG_OPAQUE_DOUBLE: "Opaque",
    snmp_netsnmp_open.TAG_NO_SUCH_OBJECT: "noSuchObject",
    snmp_netsnmp_open.TAG_NO_SUCH_INSTANCE: "noSuchInstance",
    snmp_netsnmp_open.TAG_END_OF_MIB_VIEW: "endOfMibView",
}


_OPAQUE_FLOATS = (snmp_netsnmp_open.TAG_OPAQUE_FLOAT, snmp_netsnmp_open.TAG_OPAQUE_DOUBLE)


def _render_raw(varbind: RawVarbind) -> Varbind:
    """A varbind read from an open session's answer, rendered exactly as the same varbind
    printed by ezsnmp's `snmpget` and decoded by `_decode`: OIDs as Net-SNMP prints them with
    `-On`, an Opaque float or double re-encoded from its `%f` text (`_opaque_bytes`)."""
    name, tag, value = varbind
    if tag == snmp_netsnmp_open.TAG_OID:
        value = format_oid(value)
    elif tag in _OPAQUE_FLOATS:
        # Net-SNMP prints a double as "Opaque: Float: %f" too (mib.c), so ezsnmp reads a float.
        value = _opaque_bytes(f"Float: {value:f}")
    return render_varbind(format_oid(name), _SMI_BY_TAG[tag], value)


# --------------------------------------------------------------------------------------------
# One blocking call


class _Answer(NamedTuple):
    """A response: its varbinds as printed, or the error-status and the OID it names."""

    rows: list[_Row]
    status: int = 0
    failed_oid: str | None = None
    #: The varbinds already rendered (an open session's answer): `rows` is then empty.
    varbinds: list[Varbind] | None = None


def _status_number(message: str) -> int:
    match = _REASON.search(message)
    name = match[1] if match else ""
    if name == "genError":
        name = "genErr"
    return (
        ERROR_STATUS_NAMES.index(name)
        if name in ERROR_STATUS_NAMES
        else ERROR_STATUS_NAMES.index("genErr")
    )


def _packet_answer(message: str) -> _Answer:
    failed = _FAILED.search(message)
    oid = _numeric_oid(failed[1]) if failed else None
    return _Answer([], _status_number(message), oid)


def _scrub(message: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return " ".join(message.split())


def _error(exc: Exception, where: str, ident: _Identity, user: str) -> JobError:
    """Map an ezsnmp exception to our error tree (never naming a secret)."""
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, ezsnmp.TimeoutError) or "timeout" in lowered:
        return no_response_error(where, v3=ident.community is None)
    for needle, message in _AUTH_FAILURES:
        if needle in lowered:
            named = f" for user {user!r}" if user else ""
            return DeviceAuthError(f"{where}: {message}{named}")
    if isinstance(exc, ezsnmp.ConnectionError):
        return DeviceUnreachableError(f"{where}: {_scrub(text, ident.secrets)}")
    return SnmpError(f"{where}: {_scrub(text, ident.secrets)}")


_CALLS: dict[_CallKind, Callable[[list[str]], Any]] = {
    "get": ezsnmp_calls.snmpget,
    "next": ezsnmp_calls.snmpgetnext,
    "bulk": ezsnmp_calls.snmpbulkget,
    "set": ezsnmp_calls.snmpset,
}


class _Call(NamedTuple):
    """Everything one blocking request needs; built on the loop, run in a pool thread (a named
    tuple: one is made per request, in a fraction of a frozen dataclass's time)."""

    kind: _CallKind
    device: tuple[str, int]
    peer: str
    ident: _Identity
    user: str
    names: list[str]
    timeout: float
    retries: int
    deadline: float  # time.monotonic() clock
    max_repetitions: int = 0

    def argv(self, timeout: float, retries: int, *, community: bool = True) -> list[str]:
        """ezsnmp's argument vector; `community=False` leaves `-c` out (see `_DefaultCommunity`)."""
        args = ["-On", "-Ox", "-t", f"{timeout:g}", "-r", str(retries)]
        if self.kind == "bulk":
            args.append(f"-Cr{self.max_repetitions}")
        args += self.ident.args
        if community and self.ident.community is not None:
            args += ("-c", self.ident.community)
        return [*args, self.peer, *self.names]


def _run_sync(call: _Call, gate: _UsmGate, sessions: OpenSessions | None = None) -> _Answer:
    """Run one request on this pool thread; SNMPv3 requests go through the gate, plain v1/v2c
    GETs through an open session when `sessions` can promise the same answer."""
    if _left(call.deadline) <= 0:
        raise _deadline_error(call.device)
    if not call.ident.fingerprint:
        if sessions is not None and call.kind == "get" and call.ident.c_community:
            answer = _open_get(call, sessions)
            if answer is not None:
                return answer
        return _exchange_sync(call, call.timeout, call.retries)
    with gate.use(call.device, call.ident, call.deadline) as ticket:
        timeout, retries = call.timeout, call.retries
        if ticket.new:  # engine-ID discovery is one more exchange under the same timeout
            timeout, retries = plan_timeout(_left(call.deadline) / 2, timeout, retries)
        answer = _exchange_sync(call, timeout, retries)
        ticket.ok = True
        return answer


def _open_get(call: _Call, sessions: OpenSessions) -> _Answer | None:
    """A v1/v2c GET on an open session: the same `_Answer` (or error) as `_exchange_sync`'s,
    or None when it must go through ezsnmp (see `poller.drivers.snmp_netsnmp_open`)."""
    timeout, retries = plan_timeout(_left(call.deadline), call.timeout, call.retries)
    community = call.ident.c_community
    assert community is not None  # checked by the caller
    raw = sessions.get(
        call.peer, call.ident.version, community, call.names, timeout=timeout, retries=retries
    )
    if raw is None:
        return None
    if raw is snmp_netsnmp_open.TIMED_OUT:
        raise no_response_error(f"{call.device[0]}:{call.device[1]}", v3=False)
    if raw.status:
        failed = format_oid(raw.varbinds[raw.error_index - 1][0]) if raw.error_index else None
        return _Answer([], raw.status, failed)
    return _Answer([], varbinds=[_render_raw(varbind) for varbind in raw.varbinds])


def _exchange_sync(call: _Call, timeout: float, retries: int) -> _Answer:
    timeout, retries = plan_timeout(_left(call.deadline), timeout, retries)
    where = f"{call.device[0]}:{call.device[1]}"
    held = _Process.community.enter(call.ident, call.deadline)
    try:
        results = _CALLS[call.kind](call.argv(timeout, retries, community=not held.omit))
    except ezsnmp.PacketError as exc:
        text = str(exc)
        if "Reason:" in text:
            return _packet_answer(text)
        raise _error(exc, where, call.ident, call.user) from None
    except ezsnmp.GenericError as exc:  # every ezsnmp exception derives from it
        raise _error(exc, where, call.ident, call.user) from None
    finally:
        _Process.community.leave(held)
        _after_call()
    return _Answer([(f"{r.oid}.{r.index}" if r.index else r.oid, r.type, r.value) for r in results])


# --------------------------------------------------------------------------------------------
# The backend


class NetsnmpBackend:
    """`SnmpBackend` on Net-SNMP through ezsnmp, in a bounded thread pool.

    `program_after_pages`: pages of a subtree walked in-process before the rest of it goes to
    `snmpbulkwalk`/`snmpwalk` (None: never; 0: from the start). The programs are looked up on
    PATH here, once; without them every walk stays in-process.

    `open_sessions`: Net-SNMP sessions each pool thread keeps open for plain v1/v2c GETs (0:
    every request through ezsnmp); lowered to fit a quarter of `RLIMIT_NOFILE`.
    """

    def __init__(
        self,
        *,
        threads: int = 32,
        program_after_pages: int | None = PROGRAM_AFTER_PAGES,
        open_sessions: int = OPEN_SESSIONS,
    ) -> None:
        self.threads = max(1, threads)
        self.open_sessions = max(0, open_sessions)
        #: The open sessions of plain GETs; None until the first request, or when turned off or
        #: netsnmp-cffi cannot be loaded (then every request goes through ezsnmp).
        self.sessions: OpenSessions | None = None
        self._pool: CallPool | None = None
        self.programs = WalkPrograms.find()
        self.program_after_pages = program_after_pages
        # Walk programs running at once: as many as pool threads, like the in-process calls.
        self._children = asyncio.Semaphore(self.threads)

    # ---------------------------------------------------------------------------------------
    # SnmpBackend

    # `get` and `getnext` hand back `_per_oid`'s coroutine: one coroutine less per job.

    def get(self, target: SnmpTarget, oids: Sequence[str]) -> Coroutine[Any, Any, list[Varbind]]:
        return self._per_oid(target, oids, "get")

    def getnext(
        self, target: SnmpTarget, oids: Sequence[str]
    ) -> Coroutine[Any, Any, list[Varbind]]:
        return self._per_oid(target, oids, "next")

    async def set(self, target: SnmpTarget, varbinds: Sequence[SetValue]) -> list[Varbind]:
        oids = [oid for oid, _, _ in varbinds]
        names: list[str] = []
        for index, (oid, smi, value) in enumerate(varbinds):
            names += ["." + oid, *_set_argument(index, oid, smi, value)]
        answer = await self._request(target, "set", names)
        if answer.status:
            raise snmp_status_error(answer.status, _position(answer, oids), oids, [])
        budget = OutputBudget(target.max_output_bytes)
        budget.extend([_decode(row)[0] for row in answer.rows])
        return budget.varbinds

    async def walk(
        self,
        target: SnmpTarget,
        roots: Sequence[str],
        *,
        max_repetitions: int,
        max_varbinds: int,
    ) -> WalkResult:
        budget = OutputBudget(target.max_output_bytes)
        return await walk_roots(
            roots,
            budget,
            lambda root: self._walk_root(target, root, budget, max_repetitions, max_varbinds),
        )

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Requests still running finish on their own, bounded by their timeouts.
            pool.shutdown()

    # ---------------------------------------------------------------------------------------
    # Requests

    async def _per_oid(
        self, target: SnmpTarget, oids: Sequence[str], kind: Literal["get", "next"]
    ) -> list[Varbind]:
        """GET or GETNEXT of many OIDs, in PDUs of at most `MAX_OIDS_PER_PDU` (halved on tooBig)."""
        budget = OutputBudget(target.max_output_bytes)
        chunk = MAX_OIDS_PER_PDU
        start = 0
        try:
            while start < len(oids):
                part = list(oids[start : start + chunk])
                answer = await self._request(target, kind, ["." + oid for oid in part])
                if answer.status == _TOO_BIG and len(part) > 1:
                    chunk = max(1, len(part) // 2)
                    continue
                if answer.status:
                    index = _position(answer, part)
                    raise snmp_status_error(
                        answer.status, index, oids, budget.varbinds, offset=start
                    )
                if answer.varbinds is not None:
                    budget.extend(answer.varbinds)
                else:
                    budget.extend([_decode(row)[0] for row in answer.rows])
                start += len(part)
        except JobError as exc:
            if exc.data is None:
                exc.data = {"varbinds": list(budget.varbinds)}
            raise
        return budget.varbinds

    async def _walk_root(
        self,
        target: SnmpTarget,
        root: str,
        budget: OutputBudget,
        max_repetitions: int,
        max_varbinds: int,
    ) -> bool:
        """Walk one subtree into `budget`; True when `max_varbinds` cut the walk short.

        Page by page in-process; a subtree still going after `program_after_pages` pages goes
        on in a walk program when one is installed (`_walk_program`).
        """

        async def fetch(last: tuple[int, ...], reps: int, bulk: bool) -> WalkPage:
            kind: _CallKind = "bulk" if bulk else "next"
            answer = await self._request(target, kind, ["." + format_oid(last)], reps)
            rows = []
            for row in answer.rows:
                varbind, end = _decode(row)
                rows.append((parse_oid(str(varbind["oid"])), end, varbind))
            empty_bulk = bulk and not answer.status and not answer.rows
            # snmpbulkget reports an error-status without an index (tooBig) as an empty answer;
            # the failing varbind of a GETNEXT/GETBULK is always the first one.
            return WalkPage(answer.status, 1, rows, empty_bulk=empty_bulk)

        bulk = target.auth.version != "1"
        program = self.programs.bulk if bulk else self.programs.next

        async def hand_over(walk: SubtreeWalk, page: int) -> bool | None:
            if program is None or page != self.program_after_pages:
                return None
            return await self._walk_program(target, walk, program)

        return await walk_subtree(
            fetch,
            root,
            budget,
            bulk=bulk,
            max_repetitions=max_repetitions,
            max_varbinds=max_varbinds,
            before_page=hand_over,
        )

    async def _walk_program(
        self, target: SnmpTarget, walk: SubtreeWalk, program: str
    ) -> bool | None:
        """Go on with `walk` in a walk program: True or False when the subtree is done (as
        `SubtreeWalk.page`), None to hand it back to the page-by-page walk at `walk.last`.

        Timeouts, SNMPv3 authentication failures and non-increasing OIDs raise as they do in
        the page walk; an error-status or any other failure of the program hands the walk back,
        and the next page (asked again in-process) reports it, or halves max-repetitions on
        tooBig. Killed at the deadline: `DeviceTimeoutError`, with the varbinds so far.
        """
        conf = _walk_conf(target.auth)
        if conf is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(target.deadline):
                peer, address = await _resolve(target)
                timeout, retries = plan_timeout(
                    target.deadline - loop.time(), target.timeout, target.retries
                )
                argv = walk_argv(
                    program,
                    bulk=walk.bulk,
                    peer=peer,
                    root=walk.root,
                    timeout=timeout,
                    retries=retries,
                    max_repetitions=max(1, min(walk.repetitions, walk.left + 1)),
                )
                # The longest a program may print nothing: SNMPv3 discovery and one request.
                stall = 2 * timeout * (retries + 1) + 1.0
                await self._ready()  # the private directory, for the program's own
                async with self._children:
                    try:
                        child = await WalkChild.start(
                            argv, conf, stall=stall, parent=_Process.private
                        )
                    except OSError:
                        return None  # it cannot run here after all: page by page
                    async with child:
                        try:
                            done, stopped = await _stream(child, walk)
                        except WalkStalledError:
                            return None  # going round in circles: page by page from here
                        if done is not None:
                            return done
                        code, said = await child.finish()
        except DeviceTimeoutError:
            raise
        except TimeoutError:
            raise no_response_error(
                f"{target.host}:{target.port}", v3=target.auth.version == "3", before_deadline=True
            ) from None
        done = _program_outcome(code, said, walk, f"{address[0]}:{address[1]}", target.auth.user)
        # The program stops after a page with noSuchObject/noSuchInstance; the walk goes on.
        return None if stopped else done

    def _request(
        self, target: SnmpTarget, kind: _CallKind, names: list[str], max_repetitions: int = 0
    ) -> Coroutine[Any, Any, _Answer]:
        """Run one request in the pool, never waiting past the deadline: the caller's timer
        ends it there when `target.guarded` (one timer per job), else one of its own."""
        if target.guarded:
            return self._submit(target, kind, names, max_repetitions)
        return self._timed(target, kind, names, max_repetitions)

    async def _timed(
        self, target: SnmpTarget, kind: _CallKind, names: list[str], max_repetitions: int
    ) -> _Answer:
        try:
            async with asyncio.timeout_at(target.deadline):
                return await self._submit(target, kind, names, max_repetitions)
        except DeviceTimeoutError:
            raise
        except TimeoutError:
            raise no_response_error(
                f"{target.host}:{target.port}", v3=target.auth.version == "3", before_deadline=True
            ) from None

    async def _submit(
        self, target: SnmpTarget, kind: _CallKind, names: list[str], max_repetitions: int
    ) -> _Answer:
        literal = _literal(target.host.strip("[]"), target.port)
        peer, address = literal if literal is not None else await _resolve(target)
        call = _Call(
            kind=kind,
            device=address,
            peer=peer,
            ident=_identity(target.auth),
            user=target.auth.user or "",
            names=names,
            timeout=target.timeout,
            retries=target.retries,
            deadline=time.monotonic() + (target.deadline - asyncio.get_running_loop().time()),
            max_repetitions=max_repetitions,
        )
        pool, gate = self._pool, _Process.gate
        if pool is None or gate is None:
            pool, gate = await self._ready()
        return await pool.submit(_run_sync, call, gate, self.sessions)

    async def _ready(self) -> tuple[CallPool, _UsmGate]:
        gate = _Process.gate
        if gate is None:
            gate = await asyncio.to_thread(_prepare_process)
        if self._pool is None and self.open_sessions and self.sessions is None:
            # After `_prepare_process`: Net-SNMP's initialisation reads the private directory.
            lib = await asyncio.to_thread(snmp_netsnmp_open.load)
            if lib is not None and self.sessions is None:  # not set meanwhile
                self.sessions = OpenSessions(lib, _sessions_per_thread(self))
        if self._pool is None:  # looked at again: other requests may have made it meanwhile
            on_exit = self.sessions.close_thread if self.sessions is not None else None
            self._pool = CallPool(self.threads, name="netsnmp", on_exit=on_exit)
        return self._pool, gate


async def _stream(child: WalkChild, walk: SubtreeWalk) -> tuple[bool | None, bool]:
    """Feed a walk program's rows to `walk`: True or False when the walk of the subtree is over,
    None when the program's output ended first (see `_program_outcome`); and whether the
    program stopped at an exception value (noSuchObject, noSuchInstance), which the page walk
    takes like any other value and walks on from.

    The program starts at the root: rows up to `walk.last`, which are in the budget already,
    are skipped (what follows `walk.last` is what the next page would have brought).
    """
    resume = walk.last
    skipping = resume != walk.base
    stopped = False
    while (rows := await child.rows()) is not None:
        batch: list[tuple[tuple[int, ...], bool, Varbind]] = []
        for row in rows:
            oid, varbind, end = _decode_numbered(row)
            if skipping:
                if oid <= resume:
                    continue
                skipping = False
            batch.append((oid, end, varbind))
            stopped = stopped or varbind["type"] in _STOPS_THE_PROGRAM
        if batch:
            done = walk.apply(batch)
            if done is not None:
                return done, stopped
    return None, stopped


def _program_outcome(
    code: int, said: str, walk: SubtreeWalk, where: str, user: str | None
) -> bool | None:
    """What a walk program's exit means once its rows are in: False (the subtree is done),
    None (hand the walk back to the page-by-page walk), or the error it raises."""
    text = "\n".join(line for line in said.splitlines() if not line.startswith("Created directory"))
    lowered = text.lower()
    if "error in packet" in lowered:
        return None  # an error-status: asked again in-process, which reports it as usual
    if "oid not increasing" in lowered:
        raise SnmpError(
            f"agent returned a non-increasing OID after {format_oid(walk.last)} "
            f"while walking {walk.root}",
            data={"varbinds": list(walk.budget.varbinds)},
        )
    if "timeout" in lowered:
        raise no_response_error(where, v3=bool(user))
    for needle, message in _AUTH_FAILURES:
        if needle in lowered:
            named = f" for user {user!r}" if user else ""
            raise DeviceAuthError(f"{where}: {message}{named}")
    return False if code == 0 else None


def _sessions_per_thread(backend: NetsnmpBackend) -> int:
    """`open_sessions`, lowered so that the pool's sessions hold at most a quarter of the
    process's file descriptors (`RLIMIT_NOFILE`): one UDP socket each, on up to twice as many
    threads as the pool's size (abandoned calls do not count against it, see `CallPool`)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return backend.open_sessions
    return max(1, min(backend.open_sessions, soft // 4 // (2 * backend.threads)))


def _position(answer: _Answer, oids: Sequence[str]) -> int:
    """1-based position of the OID the error-status names (its first occurrence), else 0."""
    if answer.failed_oid is None:
        return 0
    for number, oid in enumerate(oids, start=1):
        if format_oid(parse_oid(oid)) == answer.failed_oid:
            return number
    return 0


def _set_argument(index: int, oid: str, smi: str, value: int | bytes | str) -> tuple[str, str]:
    """`snmpset`'s type letter and value text for one checked set value."""
    if smi in ("OctetString",) and isinstance(value, bytes):
        return ("x", value.hex()) if value else ("s", "")
    letter = _SET_LETTERS.get(smi)
    if letter is None:
        raise SnmpError(
            f"varbinds[{index}] ({oid}): the netsnmp backend cannot send {smi} in a SET "
            "(Net-SNMP's snmpset has no such type); use USM_POLLER_SNMP_BACKEND=pysnmp"
        )
    if smi == "ObjectIdentifier":
        return letter, "." + str(value)
    return letter, str(value)


@functools.lru_cache(maxsize=4096)
def _literal(host: str, port: int) -> tuple[str, tuple[str, int]] | None:
    """`_resolve` for an IP address literal (no lookup), cached; None for a host name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return _peer(str(ip), port, ip.version == 6), (str(ip), port)


async def _resolve(target: SnmpTarget) -> tuple[str, tuple[str, int]]:
    """Net-SNMP's transport address for the agent (IPv4 preferred), and (address, port)."""
    host = target.host.strip("[]")
    literal = _literal(host, target.port)
    if literal is not None:
        return literal
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, target.port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise DeviceUnreachableError(
            f"cannot resolve host name {host!r}: {exc.args[-1] if exc.args else exc}"
        ) from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    if not infos:
        raise DeviceUnreachableError(f"host name {host!r} has no address")
    family, _type, _proto, _name, sockaddr = infos[0]
    address = str(sockaddr[0])
    return _peer(address, target.port, family == socket.AF_INET6), (address, target.port)


def _peer(address: str, port: int, ipv6: bool) -> str:
    return f"udp6:[{address}]:{port}" if ipv6 else f"udp:{address}:{port}"
