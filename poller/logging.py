"""structlog configuration: JSON lines in containers, a readable console on a TTY.

Configured once, by the CLI, before anything else logs. Standard-library loggers (pika, pysnmp,
asyncssh) go through the same renderer; pika's and scrapli's warnings and errors become debug
lines (the poller's own `broker_*` warnings and each job's result say what went wrong).
Secrets never reach a log: settings and wire models keep them in `SecretStr`, and job bodies
are never logged.

The JSON lines of structlog loggers are rendered by one fused processor, `JsonLineRenderer`: it
does in one call what the chain `merge_contextvars` → `add_log_level` → `TimeStamper(iso, utc)` →
`dict_tracebacks` → `JSONRenderer` does in five (the stdlib bridge still runs that chain), and
returns the line as bytes, which `LineWriter` writes straight to the stream's binary buffer.
Every worker writes one `job_finished` line per job, so this is on the hot path; the output is
byte for byte that of the chain (tests/unit/test_logging.py holds it to that).
"""

from __future__ import annotations

import codecs
import contextvars
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO, Literal, TextIO, cast

import pydantic_core
import structlog
from structlog.contextvars import STRUCTLOG_KEY_PREFIX, STRUCTLOG_KEY_PREFIX_LEN
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["ContextBinder", "JsonLineRenderer", "LineWriter", "configure_logging", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: Libraries that are chatty at INFO; their warnings and errors still come through.
#: httpx and httpcore log each request's URL at info, and a Telegram URL holds the bot token.
_QUIET = ("asyncssh", "pysnmp", "telnetlib3", "httpx", "httpcore", "alembic")
#: Libraries whose warnings and errors are written as debug lines, and only at level debug:
#: pika logs each failed connection attempt as several errors, with tracebacks, where the
#: poller logs one `broker_connect_failed` warning that names the cause (poller/broker.py);
#: scrapli logs a device's refused login or a timeout as `critical`, where the job's result
#: and its `job_finished` line say it (`auth_failed`, `device_timeout`): a wrong password is
#: no critical event of the poller.
_DEMOTED = ("pika", "scrapli")


def configure_logging(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Set up structlog and the stdlib root logger to write one line per event to `stream`."""
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    processors: list[Processor]
    logger_factory: Callable[..., WrappedLogger]
    direct: _Direct | None = None
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_to_json)
        shared.append(structlog.processors.dict_tracebacks)
        binary = _utf8_buffer(out)
        fused = JsonLineRenderer(as_bytes=binary is not None)
        processors = [fused]
        if binary is not None:
            writer = LineWriter(binary, text=out)
            logger_factory = _LineWriterFactory(writer)
            direct = _Direct(processors, fused, writer, numeric)
        else:
            logger_factory = structlog.WriteLoggerFactory(file=out)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        processors = [*shared, renderer]
        logger_factory = structlog.WriteLoggerFactory(file=out)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )
    global _direct  # noqa: PLW0603 - the one configuration of this process
    _direct = direct
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(_demote)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name in _DEMOTED:
        # Its warnings and errors, as debug lines when we log at debug; else not even made.
        lowest = logging.WARNING if numeric <= logging.DEBUG else logging.CRITICAL + 1
        logging.getLogger(name).setLevel(lowest)


def _demote(record: logging.LogRecord) -> bool:
    """The handler's filter: a record of a `_DEMOTED` library becomes a debug record."""
    name = record.name
    if any(name == lib or name.startswith(f"{lib}.") for lib in _DEMOTED):
        record.levelno = logging.DEBUG
        record.levelname = "DEBUG"
    return True


def _to_json(obj: object, **_: object) -> str:
    """structlog's serializer: pydantic-core's JSON encoder, ~4x faster than `json.dumps`."""
    return pydantic_core.to_json(obj, fallback=repr).decode()


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """structlog's lazy logger, which also keeps its log methods once structlog caches them."""
    return _Logger(name)


class ContextBinder:
    """`structlog.contextvars.bind_contextvars` for a fixed set of keys, values by position.

    Binds the same context variables as structlog (its first call goes through structlog,
    which makes them), then sets them directly: no name building and lookups on every call.
    The worker binds each job's keys with one.
    """

    __slots__ = ("_keys", "_vars")

    def __init__(self, *keys: str) -> None:
        self._keys = keys
        self._vars: tuple[contextvars.ContextVar[Any], ...] | None = None

    def __call__(self, *values: Any) -> None:
        bound = self._vars
        if bound is None:
            structlog.contextvars.bind_contextvars(**dict(zip(self._keys, values, strict=True)))
            names = {f"{STRUCTLOG_KEY_PREFIX}{key}": i for i, key in enumerate(self._keys)}
            found: list[contextvars.ContextVar[Any] | None] = [None] * len(self._keys)
            for var in contextvars.copy_context():
                if var.name in names:
                    found[names[var.name]] = var
            if all(var is not None for var in found):
                self._vars = tuple(v for v in found if v is not None)
            return
        for var, value in zip(bound, values, strict=True):
            var.set(value)


#: Methods of a bound logger that `_Logger` keeps once structlog caches the bound logger.
_LOG_METHODS = frozenset(
    (
        "debug",
        "info",
        "warning",
        "warn",
        "error",
        "err",
        "exception",
        "critical",
        "fatal",
        "msg",
        "log",
    )
)


class _Logger:
    """`structlog.get_logger(name)` whose log methods are looked up once, not on every call.

    structlog's lazy proxy (with `cache_logger_on_first_use`, as `configure_logging` sets)
    builds its bound logger on first use and keeps it for good, but every `log.info` still goes
    through the proxy's `__getattr__`. Once the proxy keeps its bound logger, this keeps that
    logger's methods as attributes: the same methods, without the detour. Before that (structlog
    not configured, or configured without the cache) every call asks the proxy, as before.
    """

    def __init__(self, name: str) -> None:
        self._proxy = structlog.get_logger(name)

    def __getattr__(self, name: str) -> Any:
        if name == "_proxy":  # not set yet (a copy made without __init__): no recursion
            raise AttributeError(name)
        value = getattr(self._proxy, name)
        if name in _LOG_METHODS and _loggers_are_cached():
            direct = _direct
            if direct is not None and name in _DIRECT_LEVELS and direct.configured():
                value = direct.method(_DIRECT_LEVELS[name], value)
            setattr(self, name, value)
        return value

    def __repr__(self) -> str:
        return repr(self._proxy)


#: Methods `_Direct` makes, and the level name each passes to the processors (structlog's).
_DIRECT_LEVELS = {"debug": "debug", "info": "info", "warning": "warning", "error": "error"}


class _Direct:
    """The JSON lines of `configure_logging`, written without structlog's bound-logger layers.

    structlog's method builds the event dict (its bound context, which `get_logger` leaves
    empty, then the keywords, then `event`), runs the processors and hands the rendered line to
    the wrapped logger. With the fused renderer as the only processor, that is one call of it
    and one write: a method made here does just that, and leaves every other call (positional
    arguments to interpolate, a level below the configured one, processors changed in place as
    by `structlog.testing.capture_logs`) to structlog's own method.
    """

    __slots__ = ("_level", "_processors", "_renderer", "_writer")

    def __init__(
        self,
        processors: list[Processor],
        renderer: JsonLineRenderer,
        writer: LineWriter,
        level: int,
    ) -> None:
        self._processors = processors  # the configured list itself: changes in place show
        self._renderer = renderer
        self._writer = writer
        self._level = level

    def configured(self) -> bool:
        """Whether structlog still runs the configuration this was made for."""
        return structlog.get_config()["processors"] is self._processors

    def method(self, level_name: str, fallback: Callable[..., Any]) -> Callable[..., Any]:
        if _LEVELS[level_name] < self._level:
            return fallback  # structlog's no-op
        processors, renderer, writer = self._processors, self._renderer, self._writer
        write = writer.msg

        def log(event: str, *args: Any, **kw: Any) -> Any:
            if args or len(processors) != 1 or processors[0] is not renderer:
                return fallback(event, *args, **kw)
            if event is not None:  # structlog leaves `event` out when it is None
                kw["event"] = event
            write(cast("bytes", renderer(writer, level_name, kw)))
            return None

        return log


_direct: _Direct | None = None


def _loggers_are_cached() -> bool:
    return structlog.is_configured() and bool(structlog.get_config()["cache_logger_on_first_use"])


# ------------------------------------------------------------------------------------------
# The JSON fast path


#: `structlog.processors.add_log_level`'s mapping of method names to level names.
_LEVEL_NAMES = {"warn": "warning", "exception": "error"}
_MAX_KNOWN_VARS = 1024


class _UtcClock:
    """`TimeStamper(fmt="iso", utc=True)`'s text, with the date and time of day made once a second.

    `datetime.now(UTC).isoformat()` spells microseconds only when they are not 0, and ends in
    `+00:00`, which TimeStamper replaces with `Z`; this does the same from `time.time_ns()`.
    """

    __slots__ = ("_cached", "_time_ns")

    def __init__(self, time_ns: Callable[[], int] = time.time_ns) -> None:
        self._time_ns = time_ns
        self._cached: tuple[int, str] = (-1, "")

    def __call__(self) -> str:
        second, ns = divmod(self._time_ns(), 1_000_000_000)
        cached = self._cached  # one (second, text) pair: threads never mix two seconds
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._cached = cached
        micro = ns // 1000
        return f"{cached[1]}.{micro:06d}Z" if micro else f"{cached[1]}Z"


class JsonLineRenderer:
    """The JSON chain of `configure_logging` as one processor; returns the rendered line.

    Same result as `merge_contextvars`, `add_log_level`, `TimeStamper(fmt="iso", utc=True)`,
    `dict_tracebacks` and `JSONRenderer` (pydantic-core, `repr` for what JSON cannot hold) in
    that order: the same keys in the same order, the same values. Bytes when `as_bytes`, else
    the text.
    """

    __slots__ = ("_as_bytes", "_keys", "_now")

    def __init__(self, *, as_bytes: bool = True) -> None:
        self._as_bytes = as_bytes
        self._now = _UtcClock()
        #: Context variable → its event-dict key, or None when it is not structlog's.
        self._keys: dict[contextvars.ContextVar[Any], str | None] = {}

    def __call__(
        self, logger: WrappedLogger, method_name: str, event_dict: EventDict
    ) -> bytes | str:
        # merge_contextvars: the bound context-local values, in the context's own order.
        keys = self._keys
        for var, value in contextvars.copy_context().items():
            try:
                key = keys[var]
            except KeyError:
                key = self._learn(var)
            if key is not None and value is not Ellipsis:
                event_dict.setdefault(key, value)
        event_dict["level"] = _LEVEL_NAMES.get(method_name, method_name)
        event_dict["timestamp"] = self._now()
        if "exc_info" in event_dict:
            event_dict = structlog.processors.dict_tracebacks(logger, method_name, event_dict)
        line = pydantic_core.to_json(event_dict, fallback=repr)
        return line if self._as_bytes else line.decode()

    def _learn(self, var: contextvars.ContextVar[Any]) -> str | None:
        name = var.name
        key = name[STRUCTLOG_KEY_PREFIX_LEN:] if name.startswith(STRUCTLOG_KEY_PREFIX) else None
        if len(self._keys) >= _MAX_KNOWN_VARS:  # variables made on the fly: do not grow forever
            self._keys.clear()
        self._keys[var] = key
        return key


class LineWriter:
    """structlog's wrapped logger for rendered bytes: each line is one write to the binary stream.

    `text`, the text stream over `binary` (sys.stderr over sys.stderr.buffer), is flushed first
    so that a line written through it before this one also comes out before it.
    """

    __slots__ = ("_binary", "_lock", "_text")

    def __init__(self, binary: BinaryIO, *, text: TextIO | None = None) -> None:
        self._binary = binary
        self._text = text
        self._lock = threading.Lock()

    def msg(self, line: bytes) -> None:
        """Write `line` and a newline, and flush."""
        with self._lock:
            if self._text is not None:
                self._text.flush()
            self._binary.write(line + b"\n")
            self._binary.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _LineWriterFactory:
    """structlog's logger factory: one shared `LineWriter` (positional arguments are ignored)."""

    __slots__ = ("_writer",)

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def __call__(self, *_args: Any) -> LineWriter:
        return self._writer


def _utf8_buffer(stream: TextIO) -> BinaryIO | None:
    """The binary buffer under a UTF-8 text stream (what the bytes can go to as they are)."""
    binary = getattr(stream, "buffer", None)
    encoding = getattr(stream, "encoding", None)
    if binary is None or not isinstance(encoding, str):
        return None
    try:
        if codecs.lookup(encoding).name != "utf-8":
            return None
    except LookupError:
        return None
    return binary  # type: ignore[no-any-return]
