"""Human output of the `satellite` command line: tables and a progress bar (rich).

Every function here prints for people; `--json` output is built by the commands themselves from
the objects' `as_dict()`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.padding import Padding
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from poller.wire import JobResult
from satellite.dlq import DeadLetter
from satellite.provision import Provisioned
from satellite.results import ReadStats, ReceivedResult
from satellite.status import ReplicaView, SatelliteStatus, uptime_text

__all__ = [
    "ResultPrinter",
    "dead_letters",
    "job_record",
    "job_table",
    "listening",
    "progress_bar",
    "provisioned",
    "read_summary",
    "replica_table",
    "status",
    "summarize",
]

SUMMARY_CHARS = 70


def _console(stderr: bool = False) -> Console:
    # Built per call: tests and pipes swap sys.stdout, and rich caches the stream it found.
    stream = sys.stderr if stderr else sys.stdout
    # Pipes and files: do not squeeze tables to 80 columns, unless COLUMNS says how wide.
    width = None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else 160
    return Console(file=stream, highlight=False, soft_wrap=True, width=width)


@contextlib.contextmanager
def progress_bar(total: int, *, enabled: bool, label: str) -> Iterator[Callable[[int], None]]:
    """A function to advance a progress bar on stderr by n (a no-op when not `enabled`)."""
    if not enabled:
        yield lambda n: None
        return
    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def provisioned(done: Provisioned, *, vhost: str) -> None:
    out = _console()
    verb = "created" if done.created else "updated"
    out.print(f"{verb} broker user {done.user} (vhost {vhost!r})")
    perms = done.permissions
    out.print(f"  configure  {escape(perms.configure)}")
    out.print(f"  write      {escape(perms.write)}")
    out.print(f"  read       {escape(perms.read)}")
    out.print(
        f"  topic      write {escape(perms.topic_write)} on {', '.join(perms.topic_exchanges)}"
    )
    out.print(f"  limits     {done.max_connections} connections, {done.max_channels} channels")
    if done.closed_connections:
        out.print(f"  closed {done.closed_connections} connection(s) using the old password")
    if done.dsn is None:
        out.print("password unchanged (run with --rotate for a new one and a new DSN)")
        return
    out.print("settings for the site (the password is shown only now; it is stored nowhere):")
    print(f"US_AMQP_DSN={done.dsn}")
    print(f"USM_POLLER_SATELLITE_ID={done.satellite_id}")
    print("USM_POLLER_DECLARE=false")


def summarize(result: JobResult) -> str:
    """One short line about a result: the error, or the first value gathered."""
    if result.error is not None:
        text = f"{result.error.code}: {result.error.message}"
    else:
        data: Any = result.data or {}
        varbinds = data.get("varbinds") if isinstance(data, dict) else None
        if isinstance(varbinds, list) and varbinds:
            first = varbinds[0]
            text = f"{first.get('oid')} = {first.get('value')}"
            if len(varbinds) > 1:
                text += f" (+{len(varbinds) - 1} more)"
        else:
            text = json.dumps(data, separators=(",", ":"))
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


class ResultPrinter:
    """Prints results as they arrive: JSON lines, or aligned columns under one header."""

    def __init__(self, *, json_lines: bool) -> None:
        self._json = json_lines
        self._header = False

    def print(self, received: ReceivedResult) -> None:
        if self._json:
            print(json.dumps(received.as_dict()), flush=True)
            return
        if not self._header:
            print(
                f"{'finished':<24} {'satellite':<12} {'job id':<36} {'kind':<12} "
                f"{'status'}{'duration':>11}  summary"
            )
            self._header = True
        r = received.result
        finished = r.finished_at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        print(
            f"{finished:<24} {r.satellite_id:<12} {r.job_id:<36} {r.kind:<12} "
            f"{r.status:<5} {r.duration_ms:>8.1f} ms  {summarize(r)}",
            flush=True,
        )


def read_summary(stats: ReadStats) -> str:
    parts = [f"{stats.delivered} result(s)"]
    for count, what in (
        (stats.duplicates, "duplicate(s) dropped"),
        (stats.rejected, "rejected (sender or satellite mismatch)"),
        (stats.invalid, "invalid dropped"),
        (stats.held, "of other satellites left in the queue"),
    ):
        if count:
            parts.append(f"{count} {what}")
    return "; ".join(parts)


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


#: The replica table's columns; the ones an operator needs most come first in `_DROP_ORDER`
#: last. Columns are dropped (never cut) until the table fits the terminal.
_REPLICA_COLUMNS = (
    "replica", "host", "version", "uptime", "jobs/s", "in flight",
    "loop lag", "memory", "recycled", "quarantined", "last seen",
)  # fmt: skip
_DROP_ORDER = ("version", "recycled", "memory", "host", "loop lag", "quarantined", "uptime")
"""Dropped first to last when the table is too wide: version skew and quarantined devices are
also warnings below the table; `--json` has every field."""
_INDENT = 2


def _replica_cells(replica: ReplicaView | Mapping[str, Any]) -> dict[str, str]:
    """The cells of one replica, from its view or its `as_dict()` (what the core API sends)."""
    r = replica.as_dict() if isinstance(replica, ReplicaView) else replica
    recycles = int(r.get("recycles") or 0)
    return {
        "replica": escape(str(r.get("worker"))),
        "host": escape(str(r.get("hostname"))),
        "version": escape(str(r.get("version"))),
        "uptime": uptime_text(float(r.get("uptime_s") or 0.0)),
        "jobs/s": f"{float(r.get('jobs_per_s') or 0.0):.1f}",
        "in flight": f"{r.get('in_flight')}/{r.get('concurrency')}",
        "loop lag": f"{float(r.get('loop_lag_ms') or 0.0):.1f} ms",
        "memory": _bytes(int(r.get("rss_bytes") or 0)),
        "recycled": f"{recycles} ({r.get('last_recycle')})" if recycles else "-",
        "quarantined": str(len(r.get("quarantine") or ())),
        "last seen": f"{float(r.get('last_seen_s') or 0.0):.0f} s ago",
    }


def _replica_table(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0))
    for column in columns:
        numeric = column not in ("replica", "host", "version")
        # Never an ellipsis: a replica name or host that does not fit folds onto a new line.
        table.add_column(column, overflow="fold", no_wrap=numeric, justify="left")
    for row in rows:
        table.add_row(*(row[column] for column in columns))
    return table


def replica_table(
    replicas: Sequence[ReplicaView | Mapping[str, Any]], width: int, console: Console
) -> tuple[Table, list[str]]:
    """The widest table of replicas that fits `width` columns, and the columns left out."""
    rows = [_replica_cells(replica) for replica in replicas]
    columns = list(_REPLICA_COLUMNS)
    hidden: list[str] = []
    table = _replica_table(columns, rows)
    for column in _DROP_ORDER:
        if Measurement.get(console, console.options, table).maximum <= width:
            break
        columns.remove(column)
        hidden.append(column)
        table = _replica_table(columns, rows)
    return table, hidden


def _fitted(out: Console, *parts: str) -> None:
    """A queue's line, folded between its parts (never inside one) to fit the terminal:
    continuation lines are indented by two spaces; a part wider than the terminal (a long
    queue name) stays whole."""
    line = parts[0]
    for part in parts[1:]:
        if len(line) + 1 + len(part) <= out.width:
            line = f"{line} {part}"
        else:
            out.print(line)
            line = f"  {part}"
    out.print(line)


def status(statuses: Sequence[SatelliteStatus | Mapping[str, Any]], *, clear: bool = False) -> None:
    """Satellites as `satellite status` shows them: statuses, or their `as_dict()` (the API's)."""
    out = _console()
    if clear and out.is_terminal:
        out.clear()
    if not statuses:
        out.print("no satellites (no job queues, no heartbeats)")
    for one in statuses:
        sat = one.as_dict() if isinstance(one, SatelliteStatus) else one
        mark = "[green]ok[/green]" if sat.get("ok") else "[red]PROBLEM[/red]"
        out.print(f"[bold]satellite {escape(str(sat.get('satellite_id')))}[/bold]  {mark}")
        for label, key in (("queue", "queue"), ("lane ", "lane")):
            q = sat.get(key)
            if q is None:
                continue
            rates = f"in {q['publish_rate']:.1f}/s, out {q['ack_rate']:.1f}/s"
            if key == "queue":
                rates += f", growth {q['growth_rate']:+.1f}/s; {q['dead_letters']} dead-lettered"
            _fitted(
                out,
                f"  {label} {q['name']}:",
                f"{q['ready']} ready, {q['unacked']} unacked, {q['consumers']} consumer(s);",
                rates,
            )
        if sat.get("replicas"):
            table, hidden = replica_table(sat["replicas"], out.width - _INDENT, out)
            out.print(Padding(table, (0, 0, 0, _INDENT), expand=False))
            if hidden:
                out.print(f"  [dim](not shown at this width: {', '.join(hidden)}; --json)[/dim]")
        advice = sat.get("advice")
        if advice is not None:
            verdict = escape(str(advice["verdict"]))
            out.print(f"  replicas: {advice['replicas']}; advice: [bold]{verdict}[/]")
        for problem in sat.get("problems") or ():
            out.print(f"  [red]problem:[/red] {escape(problem)}")
        for warning in sat.get("warnings") or ():
            out.print(f"  [yellow]warning:[/yellow] {escape(warning)}")


@contextlib.contextmanager
def listening(seconds: float, *, enabled: bool) -> Iterator[Callable[[float], None]]:
    """Say on stderr that `status` listens for heartbeats, and for how long.

    On a terminal a bar counts the seconds (gone when done); otherwise one line up front.
    Yields the function to call with the seconds elapsed.
    """
    if not enabled:
        yield lambda elapsed: None
        return
    err = _console(stderr=True)
    if not err.is_terminal:
        err.print(f"satellite: listening for heartbeats for {seconds:g} s (--listen)...")
        yield lambda elapsed: None
        return
    columns = (
        TextColumn(f"listening for heartbeats ({seconds:g} s, --listen)"),
        BarColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("listening", total=seconds)
        yield lambda elapsed: progress.update(task, completed=elapsed)


def dead_letters(letters: Sequence[DeadLetter]) -> None:
    out = _console()
    if not letters:
        out.print("no dead-lettered jobs")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("job id", "kind", "reason", "count", "why", "dead-lettered at", "size"):
        # Ids and times fold onto a second line rather than lose characters; so does "why".
        table.add_column(column, overflow="fold")
    for letter in letters:
        reason = letter.reason or "?"
        if letter.first_reason and letter.first_reason != letter.reason:
            reason += f" (first: {letter.first_reason})"
        # Not `deliveries`: on a quorum DLQ that is the DLQ's own count (each list, show or
        # replay that gave the message back adds one), not the job queue's (docs/core.md).
        count = str(letter.count)
        why = f"{letter.error_code}: {letter.why}" if letter.error_code else letter.why
        row = letter.summary()
        table.add_row(
            escape(str(row["job_id"] or "(no id)")),
            escape(letter.kind_text),
            escape(reason),
            count,
            escape(why),
            str(row["time"] or ""),
            f"{row['size']} B",
        )
    out.print(table)
    out.print(f"{len(letters)} dead-lettered job(s)")


#: The job table's columns (`satellite jobs`); dropped in `_JOB_DROP_ORDER` until it fits.
_JOB_COLUMNS = (
    "submitted", "job id", "satellite", "kind", "target", "status", "error",
    "duration", "answers", "source", "worker",
)  # fmt: skip
_JOB_DROP_ORDER = ("worker", "answers", "source", "duration", "satellite", "target", "submitted")


def _time(value: Any) -> str:
    """An API timestamp, to the second, in UTC (`2026-12-06 21:00:05`)."""
    if not isinstance(value, str):
        return "-"
    return value.replace("T", " ").split(".")[0].removesuffix("Z").split("+")[0]


def _job_cells(record: Mapping[str, Any]) -> dict[str, str]:
    host, port = record.get("host"), record.get("port")
    target = "-" if host is None else (f"{host}:{port}" if port is not None else str(host))
    duration = record.get("duration_ms")
    return {
        "submitted": _time(record.get("submitted_at") or record.get("created_at")),
        "job id": escape(str(record.get("id"))),
        "satellite": escape(str(record.get("satellite_id"))),
        "kind": escape(str(record.get("kind"))),
        "target": escape(target),
        "status": escape(str(record.get("status"))),
        "error": escape(str(record.get("error_code") or "-")),
        "duration": "-" if duration is None else f"{float(duration):.1f} ms",
        "answers": str(record.get("answers", 0)),
        "source": escape(str(record.get("source"))),
        "worker": escape(str(record.get("worker") or "-")),
    }


def _job_table_of(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> Table:
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0))
    for column in columns:
        # Ids fold onto a new line rather than lose characters; numbers never wrap.
        table.add_column(column, overflow="fold", no_wrap=column in ("duration", "answers"))
    for row in rows:
        table.add_row(*(row[column] for column in columns))
    return table


def job_table(records: Sequence[Mapping[str, Any]]) -> None:
    """Jobs of the history (`satellite jobs`), fitted to the terminal by dropping columns."""
    out = _console()
    if not records:
        out.print("no jobs")
        return
    rows = [_job_cells(record) for record in records]
    columns = list(_JOB_COLUMNS)
    hidden: list[str] = []
    table = _job_table_of(columns, rows)
    for column in _JOB_DROP_ORDER:
        if Measurement.get(out, out.options.update_width(10_000), table).maximum <= out.width:
            break
        columns.remove(column)
        hidden.append(column)
        table = _job_table_of(columns, rows)
    out.print(table)
    note = f"; not shown at this width: {', '.join(hidden)} (--json)" if hidden else ""
    out.print(f"{len(records)} job(s){note}", soft_wrap=False)


def job_record(record: Mapping[str, Any]) -> None:
    """One job of the history (`satellite job ID`): its fields, then its result."""
    out = _console()
    cells = _job_cells(record)
    fields = [
        ("job", cells["job id"]),
        ("satellite", cells["satellite"]),
        ("kind", cells["kind"]),
        ("target", cells["target"]),
        ("status", cells["status"]),
        ("error", cells["error"]),
        ("source", cells["source"]),
        ("submitted", _time(record.get("submitted_at") or record.get("created_at"))),
        ("started", _time(record.get("started_at"))),
        ("finished", _time(record.get("finished_at"))),
        ("duration", cells["duration"]),
        ("worker", cells["worker"]),
        ("attempt", str(record.get("attempt") or "-")),
        ("answers", cells["answers"]),
    ]
    if record.get("retry_of"):
        fields.append(("retry of", escape(str(record["retry_of"]))))
    for name, value in fields:
        out.print(f"{name + ':':<11}{value}")
    result = record.get("result")
    if isinstance(result, dict):
        out.print("result:")
        print(json.dumps(result, indent=2), flush=True)
