"""JSON log lines: the fused fast path writes exactly what structlog's processor chain wrote."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr
from structlog.typing import EventDict

from poller import logging as plog

TIMESTAMP = re.compile(r'"timestamp":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z)"')


def chain_line(method_name: str, event_dict: EventDict) -> str:
    """The line the processor chain of `configure_logging` rendered before the fast path."""
    rendered: Any = event_dict
    for processor in (
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.dict_tracebacks,
        structlog.processors.JSONRenderer(serializer=plog._to_json),
    ):
        rendered = processor(None, method_name, rendered)
    assert isinstance(rendered, str)
    return rendered


def fast_line(method_name: str, event_dict: EventDict) -> str:
    line = plog.JsonLineRenderer()(None, method_name, event_dict)
    assert isinstance(line, bytes)
    return line.decode()


def same_but_time(fast: str, chain: str) -> None:
    """Equal text once the timestamps (taken at different moments) are blanked."""
    assert TIMESTAMP.search(fast), fast
    assert TIMESTAMP.sub("T", fast) == TIMESTAMP.sub("T", chain)


def _raised() -> ValueError:
    try:
        raise ValueError("boom")  # noqa: TRY301 - a real traceback to render
    except ValueError as exc:
        return exc


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque thing>"


EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("info", {"event": "job_finished", "job_id": "j1", "outcome": "ok", "error_code": None}),
    ("info", {"event": "job_finished", "duration_ms": 1.5, "attempt": 2, "kind": "snmp.walk"}),
    ("warning", {"event": "device_quarantined", "until": None, "probe": True}),
    ("warn", {"event": "old_alias"}),
    ("error", {"event": "job_crashed", "exc_info": _raised()}),
    ("exception", {"event": "job_crashed", "exc_info": _raised()}),
    ("error", {"event": "no_error_after_all", "exc_info": False}),
    ("critical", {"event": "nested", "data": {"a": [1, 2.5, None, {"b": "c"}], "d": True}}),
    ("debug", {"event": "unicode", "text": "sw-12 é 漢字 \U0001f600", "ctrl": "a\nb\t\x01"}),
    ("info", {"event": "fallback", "thing": Opaque(), "secret": SecretStr("hunter2")}),
    ("info", {"event": "bytes", "raw": b"abc", "big": 2**80, "neg": -0.0}),
    ("info", {"event": "overrides context", "job_id": "from-kwargs", "satellite_id": "kw"}),
]


@pytest.mark.parametrize(("method_name", "event"), EVENTS)
def test_fast_line_equals_the_processor_chain(method_name: str, event: dict[str, Any]) -> None:
    ctx = structlog.contextvars.bind_contextvars
    with structlog.contextvars.bound_contextvars(satellite_id="7", worker="poller-7-0"):
        ctx(job_id="5e0b2c1e", kind="snmp.get", device="10.0.0.1", attempt=1)
        structlog.contextvars.unbind_contextvars("device")  # unbound: left out by both
        try:
            same_but_time(fast_line(method_name, dict(event)), chain_line(method_name, dict(event)))
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "kind", "attempt")


def test_fast_line_without_any_context() -> None:
    structlog.contextvars.clear_contextvars()
    event = {"event": "plain", "n": 1}
    same_but_time(fast_line("info", dict(event)), chain_line("info", dict(event)))


async def test_context_of_each_task_goes_into_its_own_lines() -> None:
    async def job(n: int) -> tuple[str, str]:
        structlog.contextvars.bind_contextvars(job_id=f"job-{n}", attempt=n)
        await asyncio.sleep(0)
        event = {"event": "job_finished", "outcome": "ok"}
        return fast_line("info", dict(event)), chain_line("info", dict(event))

    for n, (fast, chain) in enumerate(await asyncio.gather(*(job(n) for n in range(5)))):
        same_but_time(fast, chain)
        assert json.loads(fast)["job_id"] == f"job-{n}"


def test_secrets_are_masked_in_lines() -> None:
    line = fast_line("info", {"event": "x", "password": SecretStr("hunter2")})
    assert "hunter2" not in line
    assert "**********" in line


@pytest.mark.parametrize(
    "ns",
    [
        1_795_000_000_000_000_000,  # a whole second: isoformat leaves the fraction out
        1_795_000_000_123_456_789,
        1_795_000_000_000_000_999,  # under a microsecond past it: still a whole second
        1_795_000_059_999_999_999,
        946_684_800_000_001_000,
    ],
)
def test_timestamps_are_timestampers_text(ns: int) -> None:
    clock = plog._UtcClock(time_ns=lambda: ns)
    second, rest = divmod(ns, 1_000_000_000)
    expected = datetime.fromtimestamp(second, UTC).replace(microsecond=rest // 1000)
    assert clock() == expected.isoformat().replace("+00:00", "Z")
    assert clock() == expected.isoformat().replace("+00:00", "Z")  # cached second


def test_timestamp_follows_the_clock_across_seconds() -> None:
    now = [1_795_000_000_999_999_000]
    clock = plog._UtcClock(time_ns=lambda: now[0])
    assert clock().endswith(":40.999999Z")
    now[0] += 1000
    assert clock().endswith(":41Z")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`configure_logging` changes process-wide state: put it back for the other tests."""
    configured = structlog.is_configured()
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in (*plog._QUIET, *plog._DEMOTED)}
    try:
        yield
    finally:
        if configured:
            structlog.configure(**saved)
        else:
            structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, value in quiet.items():
            logging.getLogger(name).setLevel(value)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


@pytest.mark.usefixtures("restore_logging")
def test_configured_json_logging_writes_whole_lines_in_order(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with path.open("w", encoding="utf-8") as out:
        plog.configure_logging("json", "info", out)
        log = plog.get_logger("test.logging")
        log.debug("filtered_out")
        log.info("first", n=1, text="é")
        out.write("partial ")  # text written before a line comes out before it
        log.warning("second", thing=Opaque())
        logging.getLogger("asyncssh").warning("from %s", "stdlib")
        logging.getLogger("asyncssh").info("quiet library below warning")
        log.info("third")
    lines = _lines(path)
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert (first["event"], first["n"], first["text"], first["level"]) == ("first", 1, "é", "info")
    assert lines[1].startswith('partial {"thing":"<Opaque thing>","event":"second"')
    stdlib = json.loads(lines[2])
    assert (stdlib["event"], stdlib["logger"], stdlib["level"]) == (
        "from stdlib",
        "asyncssh",
        "warning",
    )
    assert json.loads(lines[3])["event"] == "third"
    # The loggers keep their methods once structlog has cached the bound logger.
    assert "info" in vars(log)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["info", "warning", "error"])
def test_pika_errors_are_not_written_above_debug(level: str) -> None:
    out = io.StringIO()
    plog.configure_logging("json", level, out)
    for name in ("pika", "pika.adapters.utils.connection_workflow"):
        logging.getLogger(name).error("AMQPConnector - reporting failure: %s", "refused")
        logging.getLogger(name).critical("as bad as it gets")
        logging.getLogger(name).warning("Received remote Channel.Close")
    plog.get_logger("poller.broker").error("ours")
    [line] = [json.loads(text) for text in out.getvalue().splitlines()]
    assert (line["event"], line["level"]) == ("ours", "error")


@pytest.mark.usefixtures("restore_logging")
def test_pika_warnings_and_errors_are_debug_lines_at_debug() -> None:
    out = io.StringIO()
    plog.configure_logging("json", "debug", out)
    logging.getLogger("pika.adapters.base_connection").error("connection_lost: %s", "reset")
    logging.getLogger("pika.channel").warning("Received remote Channel.Close")
    logging.getLogger("pika.channel").info("chatty frames")  # below pika's warning: not made
    lines = [json.loads(text) for text in out.getvalue().splitlines()]
    assert [(x["event"], x["level"], x["logger"]) for x in lines] == [
        ("connection_lost: reset", "debug", "pika.adapters.base_connection"),
        ("Received remote Channel.Close", "debug", "pika.channel"),
    ]
    # Other libraries keep their levels.
    logging.getLogger("asyncssh").error("kept")
    assert json.loads(out.getvalue().splitlines()[-1])["level"] == "error"


@pytest.mark.usefixtures("restore_logging")
def test_stream_without_a_binary_buffer_gets_the_same_lines() -> None:
    out = io.StringIO()
    plog.configure_logging("json", "info", out)
    plog.get_logger("test.logging").info("to_text", value=2.5)
    line = json.loads(out.getvalue())
    assert (line["event"], line["value"], line["level"]) == ("to_text", 2.5, "info")


@pytest.mark.usefixtures("restore_logging")
def test_stream_in_another_encoding_is_written_in_that_encoding() -> None:
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="latin-1", write_through=True)
    plog.configure_logging("json", "info", out)
    plog.get_logger("test.logging").info("latin", text="café")
    out.flush()
    assert '"text":"café"' in raw.getvalue().decode("latin-1")


@pytest.mark.usefixtures("restore_logging")
def test_capture_logs_still_captures_and_lines_resume_after() -> None:
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    plog.configure_logging("json", "info", out)
    log = plog.get_logger("test.logging")
    log.info("before")
    with structlog.testing.capture_logs() as captured:
        log.info("captured", job_id="j")
    log.info("after")
    out.flush()
    assert captured == [{"event": "captured", "job_id": "j", "log_level": "info"}]
    events = [json.loads(line)["event"] for line in raw.getvalue().decode().splitlines()]
    assert events == ["before", "after"]


@pytest.mark.usefixtures("restore_logging")
def test_console_format_is_unchanged() -> None:
    out = io.StringIO()
    plog.configure_logging("console", "info", out)
    plog.get_logger("test.logging").info("console_event", k="v")
    assert "console_event" in out.getvalue()
    assert "k=v" in out.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_loggers_are_not_pinned_before_structlog_is_configured() -> None:
    structlog.reset_defaults()
    log = plog.get_logger("test.logging.unconfigured")
    with structlog.testing.capture_logs() as captured:
        log.info("seen")
    assert captured[0]["event"] == "seen"
    assert "info" not in vars(log)


def test_line_writer_writes_one_line_per_message() -> None:
    raw = io.BytesIO()
    writer = plog.LineWriter(raw)
    writer.info(b'{"a":1}')
    writer.error(b'{"b":2}')
    assert raw.getvalue() == b'{"a":1}\n{"b":2}\n'


def test_stderr_like_streams_use_the_binary_buffer() -> None:
    assert plog._utf8_buffer(io.TextIOWrapper(io.BytesIO(), encoding="UTF8")) is not None
    assert plog._utf8_buffer(io.TextIOWrapper(io.BytesIO(), encoding="latin-1")) is None
    assert plog._utf8_buffer(io.StringIO()) is None


@pytest.mark.usefixtures("restore_logging")
def test_direct_methods_write_what_structlogs_methods_write() -> None:
    """`get_logger`'s methods skip structlog's layers once configured: the same lines."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    plog.configure_logging("json", "info", out)
    ours, theirs = plog.get_logger("test.direct"), structlog.get_logger("test.direct")
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("info", ("job_finished",), {"job_id": "j", "outcome": "ok", "error_code": None}),
        ("warning", ("job_finished",), {"duration_ms": 1.5, "error": "no answer"}),
        ("error", ("result_unroutable",), {"job_id": "j", "thing": Opaque()}),
        ("info", ("%s interpolated %d", "x", 3), {}),  # positional arguments: structlog's path
        ("debug", ("below the level",), {"k": 1}),
    ]
    ctx = contextvars.copy_context()
    ctx.run(structlog.contextvars.bind_contextvars, satellite_id="s1", attempt=2)
    for name, args, kw in calls:
        for logger in (ours, theirs):
            ctx.run(getattr(logger, name), *args, **kw)
    out.flush()
    lines = raw.getvalue().decode().splitlines()
    assert len(lines) == 8  # the debug calls write nothing
    for mine, structlogs in zip(lines[::2], lines[1::2], strict=True):
        same_but_time(mine, structlogs)
    assert json.loads(lines[0])["satellite_id"] == "s1"
    assert json.loads(lines[6])["event"] == "x interpolated 3"
    assert "_Direct" in vars(ours)["info"].__qualname__, "the direct method is the one in use"


def test_context_binder_binds_what_bind_contextvars_binds() -> None:
    bind = plog.ContextBinder("job_id", "kind", "attempt")

    def ours(*values: Any) -> dict[str, Any]:
        bind(*values)
        return dict(structlog.contextvars.merge_contextvars(None, "info", {}))

    def theirs(*values: Any) -> dict[str, Any]:
        structlog.contextvars.bind_contextvars(job_id=values[0], kind=values[1], attempt=values[2])
        return dict(structlog.contextvars.merge_contextvars(None, "info", {}))

    for values in (("j1", "snmp.get", 1), ("j2", "ssh.exec", 3)):  # first and later calls
        mine = contextvars.copy_context().run(ours, *values)
        structlogs = contextvars.copy_context().run(theirs, *values)
        assert mine == structlogs == {"job_id": values[0], "kind": values[1], "attempt": values[2]}
    assert bind._vars is not None, "later calls set the variables directly"
    assert structlog.contextvars.merge_contextvars(None, "info", {}).get("job_id") is None
