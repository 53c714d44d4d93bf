"""Plain SNMPv1/v2c GETs on Net-SNMP sessions kept open: the Net-SNMP backend's fast path.

The only module that imports netsnmp-cffi (`netsnmpy`). ezsnmp runs Net-SNMP's `snmpget` program
per request: it parses an argument vector, opens a session (a new UDP socket), sends, waits,
closes. About 40 % of that is the set-up (`bench/snmp_alternatives.py`). Here a request is a PDU
sent on a session that stays open, through Net-SNMP's single-session API (`snmp_sess_open`,
`snmp_sess_synch_response`, `snmp_sess_close`: the thread-safe one, each session used by one
thread at a time).

- **Declarations.** netsnmp-cffi ships a CFFI extension compiled against the `libnetsnmp` its
  wheel bundles (Net-SNMP 5.9), so the layouts of `netsnmp_session`, `netsnmp_pdu` and
  `variable_list` come from a C compiler, not from declarations of our own (ctypes or CFFI's ABI
  mode would copy the struct layouts by hand and break silently on another version). It declares
  Net-SNMP's traditional session API only; the four `snmp_sess_*` functions (pointers and
  integers in, pointers and integers out: no struct passed by value) are looked up in that same
  library and called through function pointers of the extension's own types. That library is
  not ezsnmp's (5.8): the two have separate state, so nothing here touches ezsnmp's globals
  (its default community, its log handlers, its SNMPv3 user table) and the other way round.
- **Sessions per pool thread.** Each thread keeps its own sessions in a small LRU keyed by
  (peer, version, community): a session is never used by two threads, and never shared by two
  communities. The per-request timeout and retries are set on the session before each request
  (Net-SNMP reads them when it sends). An evicted session is closed; a thread closes its own
  when its pool stops (`OpenSessions.close_thread`). One UDP socket per session: at most
  `per_thread` x the pool's threads sockets.
- **Only what is known to come out identical.** `get` returns None when it cannot promise the
  ezsnmp path's result (an empty or non-text community, which Net-SNMP replaces by its default;
  an OID Net-SNMP may parse otherwise; a value of a type not handled below; an error-status it
  does not name; a send error; a session that does not open): the caller then runs the request
  through ezsnmp as before. The caller turns the raw varbinds into rendered ones with the same
  helpers as Net-SNMP's printed values (`snmp_netsnmp._render_raw`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections import OrderedDict
from typing import Any, NamedTuple

__all__ = ["TIMED_OUT", "OpenSessions", "Raw", "RawVarbind", "load"]

#: Net-SNMP's `snmp_sess_synch_response` outcomes (snmp_client.h).
_STAT_SUCCESS = 0
_STAT_TIMEOUT = 2
_SNMP_MSG_GET = 0xA0
_VERSIONS = {"1": 0, "2c": 1}
#: Net-SNMP's `MAX_OID_LEN`; sub-identifiers are 32-bit.
_MAX_OID_LEN = 128
_MAX_SUBID = 0xFFFFFFFF
#: Error statuses 1..18 (RFC 3416): Net-SNMP names each the way `ERROR_STATUS_NAMES` does.
_MAX_ERROR_STATUS = 18
_LOGHANDLER_NONE = 6
_LOG_DEBUG = 7

#: BER tags of the values handled here (anything else goes through ezsnmp).
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_NULL = 0x05
TAG_OID = 0x06
TAG_IPADDRESS = 0x40
TAG_COUNTER32 = 0x41
TAG_GAUGE32 = 0x42
TAG_TIMETICKS = 0x43
TAG_OPAQUE = 0x44
TAG_COUNTER64 = 0x46
#: Net-SNMP's own tags for an Opaque that holds a float or a double (draft-perkins-opaque).
TAG_OPAQUE_FLOAT = 0x78
TAG_OPAQUE_DOUBLE = 0x79
TAG_NO_SUCH_OBJECT = 0x80
TAG_NO_SUCH_INSTANCE = 0x81
TAG_END_OF_MIB_VIEW = 0x82
_NO_VALUE = frozenset({TAG_NULL, TAG_NO_SUCH_OBJECT, TAG_NO_SUCH_INSTANCE, TAG_END_OF_MIB_VIEW})
_UNSIGNED32 = frozenset({TAG_COUNTER32, TAG_GAUGE32, TAG_TIMETICKS})
_BYTES = frozenset({TAG_OCTET_STRING, TAG_OPAQUE})
_OPAQUE_FLOATS = frozenset({TAG_OPAQUE_FLOAT, TAG_OPAQUE_DOUBLE})

#: (name, tag, value): value is an int, bytes (OCTET STRING, Opaque, the 4 bytes of an
#: IpAddress), a tuple of ints (OID), a float (Opaque float/double) or None.
RawVarbind = tuple[tuple[int, ...], int, Any]


class Raw(NamedTuple):
    """An answer: its varbinds, and the error-status and error-index (0 when none)."""

    varbinds: list[RawVarbind]
    status: int = 0
    error_index: int = 0


_UNHANDLED = object()

#: `get`'s answer when the agent did not answer within the timeout and retries.
TIMED_OUT = Raw([], -1)


class _Lib:
    """netsnmp-cffi's compiled declarations, and the single-session functions of its library."""

    def __init__(self, module: Any) -> None:
        self.ffi, self.lib = module.ffi, module.lib
        handle = ctypes.CDLL(module.__file__, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)

        def function(name: str, signature: str) -> Any:
            address = ctypes.cast(getattr(handle, name), ctypes.c_void_p).value
            return self.ffi.cast(signature, address)

        self.sess_open = function("snmp_sess_open", "void *(*)(netsnmp_session *)")
        self.sess_session = function("snmp_sess_session", "netsnmp_session *(*)(void *)")
        self.sess_synch_response = function(
            "snmp_sess_synch_response", "int (*)(void *, netsnmp_pdu *, netsnmp_pdu **)"
        )
        self.sess_close = function("snmp_sess_close", "int (*)(void *)")
        self.oid_size = self.ffi.sizeof("oid")


_loaded: list[_Lib | None] = []
_load_lock = threading.Lock()


def load() -> _Lib | None:
    """Load and initialise netsnmp-cffi's Net-SNMP once per process; None when it cannot be.

    Call it after the backend pointed `SNMPCONFPATH`, `SNMP_PERSISTENT_DIR`, `MIBDIRS` and `MIBS`
    at its private directory (`snmp_netsnmp._prepare_process`): `init_snmp` reads them.
    """
    with _load_lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> _Lib | None:
    try:
        from netsnmpy import _netsnmp  # noqa: PLC0415 - optional, loaded on first use only

        lib = _Lib(_netsnmp)
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    # Registers the UDP transports and reads the (private, empty) configuration. A "no logging"
    # handler for every priority: Net-SNMP would otherwise print its log messages on stderr.
    lib.lib.init_snmp(b"usm-poller")
    lib.lib.netsnmp_register_loghandler(_LOGHANDLER_NONE, _LOG_DEBUG)
    return lib


@functools.lru_cache(maxsize=4096)
def _oid(lib: _Lib, name: str) -> tuple[Any, int] | None:
    """`.1.3.6...` as a C `oid[]` and its length; None when Net-SNMP might read it otherwise."""
    parts = name.removeprefix(".").split(".")
    if not 2 <= len(parts) <= _MAX_OID_LEN:
        return None
    arcs = []
    for part in parts:
        if not (part.isascii() and part.isdigit()):
            return None
        arc = int(part)
        if arc > _MAX_SUBID:
            return None
        arcs.append(arc)
    return lib.ffi.new("oid[]", arcs), len(arcs)


class _Session(NamedTuple):
    handle: Any  # Net-SNMP's opaque session pointer (`snmp_sess_open`)
    session: Any  # its `netsnmp_session *`, where the timeout and retries are set


class _ThreadSessions:
    """One pool thread's open sessions, least recently used first."""

    def __init__(self) -> None:
        self.sessions: OrderedDict[tuple[str, int, bytes], _Session] = OrderedDict()
        self.pid = os.getpid()
        self.opened = 0  # sessions this thread opened
        self.handled = 0  # requests answered here (not handed to ezsnmp)


class OpenSessions:
    """Net-SNMP sessions kept open per pool thread, for one backend (see the module's text).

    `per_thread`: sessions each thread keeps open (least recently used closed first).
    """

    def __init__(self, lib: _Lib, per_thread: int) -> None:
        self.lib = lib
        self.per_thread = max(1, per_thread)
        self._local = threading.local()
        self._threads: list[_ThreadSessions] = []  # for the counts (under `_load_lock`)

    @property
    def opened(self) -> int:
        """Sessions opened so far, by all threads (for tests and diagnostics)."""
        return sum(mine.opened for mine in self._threads)

    @property
    def handled(self) -> int:
        """Requests answered on open sessions so far (the others went through ezsnmp)."""
        return sum(mine.handled for mine in self._threads)

    def get(
        self,
        peer: str,
        version: str,
        community: bytes,
        names: list[str],
        *,
        timeout: float,
        retries: int,
    ) -> Raw | None:
        """GET `names` (`.1.3.6...`); None: not handled here, run the request through ezsnmp."""
        lib = self.lib
        ffi, c = lib.ffi, lib.lib
        oids = []
        for name in names:
            oid = _oid(lib, name)
            if oid is None:
                return None
            oids.append(oid)
        mine = self._mine()
        entry = self._session(mine, peer, version, community)
        if entry is None:
            return None
        # ezsnmp's `-t T`: Net-SNMP's `atof(T) * 1000000`, the same double arithmetic.
        entry.session.timeout = int(float(f"{timeout:g}") * 1_000_000)
        entry.session.retries = retries
        pdu = c.snmp_pdu_create(_SNMP_MSG_GET)
        if pdu == ffi.NULL:
            return None
        for array, length in oids:
            c.snmp_add_null_var(pdu, array, length)
        out = ffi.new("netsnmp_pdu **")
        # The request PDU is Net-SNMP's from here on (sent and freed, or freed on failure).
        status = lib.sess_synch_response(entry.handle, pdu, out)
        if status == _STAT_TIMEOUT:
            mine.handled += 1
            return TIMED_OUT
        response = out[0]
        if status != _STAT_SUCCESS or response == ffi.NULL:
            if response != ffi.NULL:
                c.snmp_free_pdu(response)
            return None  # a send error: ezsnmp reports it in its own words
        try:
            raw = self._read(response)
        finally:
            c.snmp_free_pdu(response)
        if raw is not None:
            mine.handled += 1
        return raw

    def _read(self, response: Any) -> Raw | None:
        ffi = self.lib.ffi
        varbinds: list[RawVarbind] = []
        var = response.variables
        while var != ffi.NULL:
            if var.name_length < 2:  # Net-SNMP would print such a name in another form
                return None
            value = self._value(var)
            if value is _UNHANDLED:
                return None
            varbinds.append((tuple(ffi.unpack(var.name, var.name_length)), var.type, value))
            var = var.next_variable
        status, index = response.errstat, response.errindex
        if status and not (0 < status <= _MAX_ERROR_STATUS and 0 <= index <= len(varbinds)):
            return None  # named otherwise by Net-SNMP's snmpget: let it say it
        return Raw(varbinds, status, index)

    def _value(self, var: Any) -> Any:  # noqa: PLR0911 - a return per type: the fastest form
        """One varbind's value (see `RawVarbind`), or `_UNHANDLED`."""
        ffi = self.lib.ffi
        tag, size = var.type, var.val_len
        if tag in _BYTES:
            return ffi.buffer(var.val.string, size)[:] if size else b""
        if tag in _UNSIGNED32:
            return var.val.integer[0] & 0xFFFFFFFF
        if tag == TAG_INTEGER:
            return var.val.integer[0]
        if tag in _NO_VALUE:
            return None
        if tag == TAG_OID:
            count = size // self.lib.oid_size
            # Fewer than two sub-identifiers: Net-SNMP prints such an OID in another form.
            return tuple(ffi.unpack(var.val.objid, count)) if count >= 2 else _UNHANDLED
        if tag == TAG_COUNTER64:
            counter = var.val.counter64
            return ((counter.high & 0xFFFFFFFF) << 32) | (counter.low & 0xFFFFFFFF)
        if tag == TAG_IPADDRESS:  # IPv4 only, as Net-SNMP prints it
            return ffi.buffer(var.val.string, 4)[:] if size == 4 else _UNHANDLED
        if tag in _OPAQUE_FLOATS:
            number = float(var.val.floatVal[0] if tag == TAG_OPAQUE_FLOAT else var.val.doubleVal[0])
            # C prints a NaN as "nan" or "-nan" (its sign), Python as "nan": let ezsnmp print it.
            return _UNHANDLED if math.isnan(number) else number
        return _UNHANDLED

    def _mine(self) -> _ThreadSessions:
        mine: _ThreadSessions | None = getattr(self._local, "sessions", None)
        if mine is None or mine.pid != os.getpid():  # a forked child opens its own
            mine = self._local.sessions = _ThreadSessions()
            with _load_lock:
                self._threads.append(mine)
        return mine

    def _session(
        self, mine: _ThreadSessions, peer: str, version: str, community: bytes
    ) -> _Session | None:
        key = (peer, _VERSIONS[version], community)
        sessions = mine.sessions
        entry = sessions.get(key)
        if entry is not None:
            sessions.move_to_end(key)
            return entry
        entry = self._open(*key)
        if entry is None:
            return None
        mine.opened += 1
        sessions[key] = entry
        while len(sessions) > self.per_thread:
            _, old = sessions.popitem(last=False)
            self._close(old)
        return entry

    def _open(self, peer: str, version: int, community: bytes) -> _Session | None:
        lib = self.lib
        ffi = lib.ffi
        settings = ffi.new("netsnmp_session *")
        lib.lib.snmp_sess_init(settings)
        settings.version = version
        c_peer = ffi.new("char[]", peer.encode())
        c_community = ffi.new("char[]", community)
        settings.peername = c_peer
        settings.community = ffi.cast("u_char *", c_community)
        settings.community_len = len(community)
        with _load_lock:  # opening touches Net-SNMP's process-wide lists: one at a time
            handle = lib.sess_open(settings)  # copies the peer name and the community
        if handle == ffi.NULL:
            return None
        session = lib.sess_session(handle)
        if session == ffi.NULL:
            self._close(_Session(handle, None))
            return None
        return _Session(handle, session)

    def _close(self, entry: _Session) -> None:
        with _load_lock:
            self.lib.sess_close(entry.handle)

    def open_here(self) -> int:
        """Sessions the calling thread has open (for tests)."""
        mine: _ThreadSessions | None = getattr(self._local, "sessions", None)
        return len(mine.sessions) if mine is not None and mine.pid == os.getpid() else 0

    def close_thread(self) -> None:
        """Close the calling thread's sessions (its pool is stopping)."""
        mine: _ThreadSessions | None = getattr(self._local, "sessions", None)
        self._local.sessions = None
        if mine is None or mine.pid != os.getpid():
            return
        while mine.sessions:
            _, entry = mine.sessions.popitem()
            self._close(entry)
