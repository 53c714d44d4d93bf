"""Fault-injection suite (issue 17): run the scenarios of `tests/faults` and write the table.

    .venv/bin/python bench/faults.py --long        # the long versions; writes docs/reliability.md
    .venv/bin/python bench/faults.py               # the short versions of every scenario
    .venv/bin/python bench/faults.py --no-write -k poison
    .venv/bin/python bench/faults.py --long --timeout 2700 tests/faults/test_broker.py ...

It runs pytest on `tests/faults` (every scenario; CI runs the same short versions) with
`USM_FAULTS_LONG=1` for `--long` (10,000-job SIGKILL loops, a 60 s SIGSTOP, 100 of each bad
input, ten broker restarts, each cluster loss three times, a longer fuzzing budget) and
`USM_FAULTS_REPORT` pointing at a file where every scenario appends its figures, then writes
docs/reliability.md: date, versions, machine, one row per scenario, and what each figure means
for an operator. The scenarios bound themselves in time; `--timeout` bounds the whole run (pytest
gets SIGINT, ends the running scenario and tears its fixtures down; the page then has the rows
of the scenarios that finished, and says so). Paths run in the order given. pytest's exit code
is this program's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller import __version__  # noqa: E402
from tests.faults.checker import header  # noqa: E402
from tests.support.rabbitmq import rabbitmqctl  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"

INTRO = """\
# Reliability: what the fault-injection suite shows

The poller promises at-least-once delivery with nothing lost and every duplicate flagged
(docs/design.md, "Delivery semantics"). `tests/faults` tries to break that promise with real
processes and the real broker: pollers SIGKILLed, SIGTERMed, frozen with SIGSTOP, killed between
a result's confirm and its job's ack, a job that kills every poller that runs it, a matrix
of bad input, and partitions and packet loss between a poller and its broker (network
namespaces of the test). Every scenario is checked by one "total queue" checker
(`tests/faults/checker.py`, in the manner of RabbitMQ's Jepsen tests): it records every job
the core published and whether the broker confirmed it, every result, the dead-letter queue,
and, at a fake SNMP device (`tests/faults/device.py`), every execution of every job.

CI runs the short version of every scenario (`bash scripts/test.sh`, marker `faults`; about
6 minutes of the run on this 2-core machine). Scenarios 4, 8 and 9 share one private RabbitMQ
node (tests/faults/node.py), scenario 5 loses its four kinds of node in turn on one fleet of
the session's 3-node cluster. `bench/faults.py --long` runs the long versions of every scenario
(`USM_FAULTS_LONG=1`) and writes this page; `bench/faults.py` alone, the short ones. The
scenarios send bulk jobs only, and run their pollers with the in-process lane
(`USM_POLLER_INTERACTIVE_PROCESS=false`; the lane process, the default, has tests of its own).
"""

MEANING = """\
## What each figure means for an operator

- **published**: jobs the core sent.
- **confirmed**: jobs the broker confirmed to the core (publisher confirms): from then on the
  broker owns them. Equal to published unless the broker refused some.
- **answered**: jobs with at least one result: confirmed, less what the DLQ holds unanswered.
- **lost**: confirmed jobs with no result and no copy in the DLQ. **Always 0**; anything else
  is a bug.
- **unexpected**: results for ids never published. **Always 0.**
- **executed twice**: jobs that reached their device more than once (counted at the device and
  from the results). Above 0 after crashes: a poller killed mid-job leaves its job to be run
  again. Never for a job with `idempotent: false`: that one is answered `outcome_unknown`.
- **flagged**: jobs answered or executed more than once whose later results carry
  `redelivered: true` and `attempt` > 1. Equal to executed twice (or answered twice): a consumer
  can always tell a repeat from a first answer.
- **DLQ (got/expected)**: messages in the satellite's dead-letter queue, against what the
  scenario put there (bad input, a poison job); never an innocent job.
- **recover (s)**: for each fault, the time until every confirmed job published before it had its
  first answer; the worst over the faults. A kill costs about one job's run time plus a
  redelivery; a frozen or cut-off poller 2-3 AMQP heartbeats (`USM_POLLER_HEARTBEAT`).

Scenario notes:

- **1 SIGKILL loop**: one of three pollers is killed every 2 s and restarted. Jobs a killed
  poller was running come back at once (the broker sees the connection die) and run again,
  flagged. With `idempotent: false` they are answered `outcome_unknown` instead of running
  again: executed twice is 0.
- **2 rolling restart**: each poller gets SIGTERM in turn: it stops consuming, finishes its
  running jobs within `USM_POLLER_SHUTDOWN_GRACE`, returns the unstarted ones and exits 0.
  Nothing runs twice.
- **3 hung poller**: SIGSTOP freezes a poller; the broker drops it after about 3 heartbeats
  and hands its jobs to the others. After SIGCONT it reconnects, drops the acks of its old
  channel (the broker already gave those jobs away) and consumes again, without a crash.
- **6 partition**: the poller runs in a network namespace of the test whose only way to the
  broker is a veth link; iptables drops the broker's TCP traffic on it, first both ways, then
  broker to poller only (the poller's frames still arrive), while a bystander poller keeps
  working. The poller notices a silent link within 2.25 heartbeat intervals (it gives up a
  connection on which nothing arrived for two intervals: `broker_link_silent`), the broker
  hands its unacked jobs to the bystander (flagged `redelivered`), and the poller is consuming
  again within 10 s of the heal. The row names the heartbeat and, per direction, how long the
  poller took to notice and to come back.
- **7 lossy uplink**: the same link drops 5%, then 20% of the poller's packets to the broker at
  random (iptables `statistic`; this kernel has no netem). TCP retransmits: no heartbeat
  disconnect at 5%, nothing lost at either; the row names the packets dropped and the
  disconnects at 5%/20%.
- **4 lone broker SIGKILLed**: a private RabbitMQ node (never the machine's broker; the one
  scenarios 4, 8 and 9 share, tests/faults/node.py) is killed and started again under load (CI:
  twice; long: 10 times, 20 s apart). Publishes while it is down are refused (confirmed <
  published); every confirmed job is answered, no poller exits, and every poller consumes again
  within 15 s of the node's return: the reconnect backoff is capped at 8 s (at 30 s, pollers
  came back up to 28 s after the node did). Recover includes the node's own restart.
- **5 3-node cluster**: one fleet and one stream for four losses in turn (long: the four, three
  times over), each loss's nodes started again before the next; a row per kind of loss counts
  the jobs published in its window (from the end of the loss before it until every poller
  consumed again). Pollers list all three nodes; the job queue's leader is node 1, the pollers
  are on node 2, the core (its own client, `satellite.client.Client`) on node 3 first, with an
  RPC caller's classic reply queue. (a) the job queue's leader is killed (whichever node leads
  it then): a follower takes over, nothing is redelivered; (b) the pollers' node: they fail
  over to another URL, their unacked jobs run again, flagged; (c) node 3, the node of the
  classic reply queue (and of the core's connection): the core fails over, and a job it
  publishes again after losing the connection before the confirm carries `x-usm-resent`, so
  that if both copies are queued the second result is flagged (before that, a job ran twice
  with neither result flagged); (d) two nodes of three: the node left refuses or holds every
  publish (no confirm until the others return) and nothing is lost.
- **10 kill between confirm and ack**: a test hook kills the poller right after a result's
  confirm, before the ack, on 1% of jobs. The job comes back and is answered again, flagged:
  duplicates are at least the kills (jobs whose confirms arrived in the same frame as the killed
  job's are returned too).
- **11 poison job**: one job kills every process that runs it (a test hook, just before its
  driver runs), in a batch of innocent ones that one poller holds all at once; a supervisor
  restarts the poller. The poller crashes on the first two deliveries only: from the third on
  (`USM_POLLER_SANDBOX_AFTER`, 2) each job of the batch runs in a sandbox child of its own, so
  the poison job kills only its child, is requeued each time, and on the last delivery the
  queue allows (`x-delivery-limit`, 20) is answered `worker_crashed` and dead-lettered; every
  innocent job is answered, none reaches the DLQ (docs/operations.md, "Poison jobs"). Executed
  twice: jobs that had reached the device when the poller crashed, flagged.
- **12 bad input**: broken JSON, a wrong content type, a 300 KiB body, `v: 99`, extra and
  missing fields, wrong types, shell and path strings in OIDs, an expired `not_after`, shell
  strings in `ssh.exec` commands (sent to the device as text, never to a local shell): every one
  answered with its documented code (docs/errors.md) and the invalid ones dead-lettered; no
  device contacted, no poller exit, no body or secret in the log.
- **8 memory alarm** (the private node, tests/faults/node.py): the memory watermark
  set near zero for 10 s (60 s long) while a backlog is worked off. The broker blocks the
  poller's connection: no result reaches the queue while the alarm lasts, the poller holds at
  most its window (prefetch, plus the spare consumer's if it was open: 254 of 256 in the short
  run, the rest stays ready in the queue), its RSS grows by under 2 MB, and it resumes when the
  watermark is restored. Before this suite, a result whose confirm waited longer than
  `USM_POLLER_PUBLISH_TIMEOUT` (30 s) in an alarm had its job returned to the queue although the
  result reached it after the alarm: every job held in an alarm longer than 30 s ran twice (45 of
  1,000 with a 5 s timeout and a 15 s alarm). The time the broker blocks publishes no longer
  counts against the confirm's timeout (pika's `blocked_connection_timeout`, 300 s, bounds it).
- **9 consumer timeout** (the private node, `consumer_timeout` 5 s, 30 s long; the node checks
  every second): jobs that finish within it never trip it. A job whose device answers after
  longer than it makes the broker close the poller's channel with 406 PRECONDITION_FAILED; the
  poller reconnects (under a second), and nothing is lost. Before this suite the slow job's
  result, published as the channel closed, was dropped and the job ran again from the start,
  tripping the timeout again every time (5 runs and 5 channel closes in the short run, 32 jobs
  run twice). Now a result whose channel went before its confirm is published again on the
  next channel (flagged `redelivered`, since the broker may have kept the first copy), and a
  redelivered job that is still running in the same process waits for that run instead of
  running again: 1 run, 1 channel close, 1 job answered twice (flagged). Keep
  `consumer_timeout` above the longest job `timeout` plus the time a job can wait for its
  device slot: every trip returns all the jobs the poller holds.
- **14 core replica SIGKILLed** (two `satellite serve` replicas on one PostgreSQL, a real poller):
  (a) while it ingests (small commits, the results waiting in `usm_poller.history`): one history
  row per answered job, none lost; before this suite, a result the broker redelivered because the
  replica died after its commit and before its ack was counted as a second answer (2 of 1,500
  rows said `answers: 2` for a job answered once); the store now counts the same result message
  (same worker, attempt and finish time) once. Its "recover" is the time from the kill until
  every row was written (the other replica and the restarted one starting at a load of 15-18).
  (b) in the confirm window of a schedule's slot: a test hook makes the replica exit right
  after the broker confirmed a whole slot of a `spread: false` schedule (30 targets), before it
  deletes the slot's outbox rows (CI: once; long: 4 times). Its restarted copy takes the rows
  over when their lease expires and publishes them again marked `x-usm-resent` (it cannot know
  that they went out); no poller runs until then, so both copies of each job are queued and
  reach the poller. A resent copy is flagged: answered again, its answer says `redelivered`
  (results and history); taken while the first copy of its job runs (what happens here), it is
  answered by that run and acked (`answered_by_earlier_run`): one answer per job. Long: the
  restarted replica's own next slot is published and answered once.
- **13 fuzzing** (no row): `decode_job` under hypothesis and atheris raises `WireError` and
  nothing else, within 100 ms of CPU per input.
"""


def versions() -> str:
    try:
        status = rabbitmqctl("version", timeout=30).strip()
    except RuntimeError as exc:
        status = f"unknown ({exc})"
    import pika  # noqa: PLC0415 - only for its version

    return (
        f"poller {__version__}, Python {platform.python_version()}, pika {pika.__version__}, "
        f"RabbitMQ {status}"
    )


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = Path("/proc/loadavg").read_text().split()[0]
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, load {load}"


def render(rows: list[dict[str, Any]], *, long: bool, took: float, outcome: str) -> str:
    from tests.faults.checker import Report  # noqa: PLC0415

    lines = [INTRO]
    kind = "long" if long else "short (CI)"
    lines.append(f"## Last run: {kind} versions\n")
    lines.append(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lines.append(f"- versions: {versions()}")
    lines.append(f"- machine: {machine()}")
    lines.append(f"- took {took:.0f} s; pytest: {outcome}\n")
    lines.append(header())
    lines.extend(Report(**{**r, "problems": tuple(r.get("problems") or ())}).row() for r in rows)
    lines.append("")
    lines.append(MEANING)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="run the long versions")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    parser.add_argument("-k", default="", help="pytest -k expression: a subset of scenarios")
    parser.add_argument(
        "--timeout", type=float, default=0.0, help="stop the run after this many seconds"
    )
    parser.add_argument("paths", nargs="*", default=["tests/faults"], help="test files, in order")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "reports.jsonl"
        env = {**os.environ, "USM_FAULTS_REPORT": str(report)}
        if args.long:
            env["USM_FAULTS_LONG"] = "1"
        command = [sys.executable, "-m", "pytest", "-q", *args.paths, "-p", "no:cacheprovider"]
        if args.k:
            command += ["-k", args.k]
        started = time.monotonic()
        code, stopped = _run(command, env, args.timeout)
        took = time.monotonic() - started
        rows = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
    outcome = "all passed" if code == 0 else f"exit {code} (see its output)"
    if stopped:
        outcome = f"stopped after {args.timeout:.0f} s (--timeout): the scenarios that finished"
    text = render(rows, long=args.long, took=took, outcome=outcome)
    if args.no_write:
        print(text)
    else:
        DOC.write_text(text + ("\n" if not text.endswith("\n") else ""))
        print(f"wrote {DOC.relative_to(ROOT)} ({len(rows)} scenarios, {outcome})")
    return code


def _run(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, bool]:
    """Run pytest; past `timeout` s (0: none) SIGINT it and wait for its teardown. (exit code,
    whether it was stopped)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env)
    try:
        return proc.wait(timeout=timeout or None), False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # pytest ends the running test, runs its teardowns
        try:
            return proc.wait(timeout=300), True
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(), True


if __name__ == "__main__":
    sys.exit(main())
