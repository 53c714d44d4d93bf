"""structlog configuration: JSON lines in containers, a readable console on a TTY.

Configured once, by the CLI, before anything else logs. Standard-library loggers (pika, pysnmp,
asyncssh) go through the same renderer. Secrets never reach a log: settings and wire models keep
them in `SecretStr`, and job bodies are never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import pydantic_core
import structlog
from structlog.typing import Processor

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: Libraries that are chatty at INFO; their warnings and errors still come through.
_QUIET = ("pika", "asyncssh", "scrapli", "pysnmp", "telnetlib3")


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
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_to_json)
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def _to_json(obj: object, **_: object) -> str:
    """structlog's serializer: pydantic-core's JSON encoder, ~4x faster than `json.dumps`."""
    return pydantic_core.to_json(obj, fallback=repr).decode()


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
