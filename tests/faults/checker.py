"""The "total queue" checker every fault scenario shares (issue 17).

A scenario records what the core did and saw: every job it published and whether the broker
confirmed it, every result that reached its result queue (in arrival order), what the
dead-letter queue held at the end, and, where the device can count, how often each job was
executed at the device. `check()` turns that into one `Report`:

- **published / confirmed**: jobs the scenario sent, and those the broker confirmed;
- **answered**: published jobs with at least one result;
- **lost**: confirmed jobs with neither a result nor a copy in the DLQ (must be 0);
- **unexpected**: results for ids that were never published (must be 0);
- **executed twice**: jobs executed more than once, by their results (a result that ran the
  job, i.e. any but the codes in `NOT_RUN`) or by the device's own count;
- **flagged**: jobs answered more than once whose later answers carry `redelivered: true`
  (every job answered or executed more than once must be flagged);
- **non-idempotent executed twice**: must be 0 (`outcome_unknown` instead);
- **DLQ**: what the dead-letter queue held, against what the scenario put there;
- **recover**: for each fault, the time until every confirmed job published before it had its
  first answer; the worst over the faults (how long a fault delays answers).

`Report.row()` is one line of the table `tests/faults` prints and `bench/faults.py` writes to
docs/reliability.md; `Report.problems` says which invariant failed, and
`assert_invariants` raises with all of them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "NOT_RUN",
    "Answer",
    "DeadLetter",
    "Expectation",
    "Observation",
    "PublishedJob",
    "Report",
    "assert_invariants",
    "check",
    "header",
]

#: Error codes of results that did not run the job at the device.
NOT_RUN = frozenset(
    {
        "outcome_unknown",
        "expired",
        "invalid_job",
        "unsupported_version",
        "unknown_kind",
        "credential_not_found",
    }
)


@dataclass(frozen=True, slots=True)
class PublishedJob:
    job_id: str
    confirmed: bool
    at: float  # monotonic time of the publish
    idempotent: bool = True


@dataclass(frozen=True, slots=True)
class Answer:
    """One result as the core received it."""

    job_id: str
    at: float  # monotonic arrival time
    status: str = "ok"
    code: str | None = None
    attempt: int = 1
    redelivered: bool = False
    worker: str = ""

    @property
    def ran(self) -> bool:
        """Whether this answer says the job was executed (contacted its device)."""
        return self.code not in NOT_RUN

    @property
    def flagged(self) -> bool:
        return self.redelivered or self.attempt > 1


@dataclass(frozen=True, slots=True)
class DeadLetter:
    job_id: str | None  # the message id, when the message had one
    reason: str = ""  # x-death reason: rejected, delivery_limit, expired, ...


@dataclass
class Observation:
    published: list[PublishedJob] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    #: Executions counted by the device per job id; None when the device cannot count.
    executions: Mapping[str, int] | None = None
    #: Monotonic times of the faults the scenario injected.
    faults: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Expectation:
    #: Ids the scenario expects in the DLQ (each once); anything else there is a problem.
    dlq: frozenset[str] = frozenset()
    #: Messages without an id the scenario expects in the DLQ.
    dlq_without_id: int = 0


@dataclass(frozen=True, slots=True)
class Report:
    scenario: str
    published: int
    confirmed: int
    answered: int
    lost: int
    unexpected: int
    executed_twice: int
    answered_twice: int
    flagged: int
    non_idempotent_twice: int
    dlq: int
    dlq_expected: int
    recover_s: float | None
    problems: tuple[str, ...]
    #: Some ids of each problem, for the failure message.
    samples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def row(self) -> str:
        recover = "-" if self.recover_s is None else _seconds(self.recover_s)
        cells = (
            self.scenario,
            self.published,
            self.confirmed,
            self.answered,
            self.lost,
            self.unexpected,
            self.executed_twice,
            self.flagged,
            f"{self.dlq}/{self.dlq_expected}",
            recover,
        )
        return "| " + " | ".join(str(c) for c in cells) + " |"


def header() -> str:
    return (
        "| scenario | published | confirmed | answered | lost | unexpected | executed twice "
        "| flagged | DLQ (got/expected) | recover (s) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )


def _seconds(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.1f}"


def _first(ids: Iterable[str], n: int = 5) -> tuple[str, ...]:
    return tuple(sorted(ids)[:n])


def check(scenario: str, obs: Observation, expect: Expectation = Expectation()) -> Report:
    """Compute the figures of one scenario run and the invariants it broke."""
    published = {p.job_id: p for p in obs.published}
    confirmed = {job_id for job_id, p in published.items() if p.confirmed}
    by_job: dict[str, list[Answer]] = {}
    for answer in obs.answers:
        by_job.setdefault(answer.job_id, []).append(answer)
    dead_ids = Counter(d.job_id for d in obs.dead if d.job_id is not None)
    dead_without_id = sum(1 for d in obs.dead if d.job_id is None)

    answered = {job_id for job_id in by_job if job_id in published}
    lost = confirmed - answered - set(dead_ids)
    unexpected = set(by_job) - set(published)

    executions: dict[str, int] = {}
    for job_id, answers in by_job.items():
        executions[job_id] = sum(1 for a in answers if a.ran)
    for job_id, count in (obs.executions or {}).items():
        executions[job_id] = max(executions.get(job_id, 0), count)
    twice = {job_id for job_id, n in executions.items() if n >= 2}
    answered_twice = {job_id for job_id, answers in by_job.items() if len(answers) >= 2}
    flagged = set()
    unflagged = set()
    for job_id in twice | answered_twice:
        answers = by_job.get(job_id, [])
        if not answers:
            continue  # executed, never answered: the loss and DLQ checks speak for it
        unmarked = sum(1 for a in answers if not a.flagged)
        if unmarked <= 1 and any(a.flagged for a in answers):
            flagged.add(job_id)
        else:
            unflagged.add(job_id)
    non_idempotent_twice = {
        job_id for job_id in twice if job_id in published and not published[job_id].idempotent
    }

    dlq_unexpected = {job_id for job_id in dead_ids if job_id not in expect.dlq}
    dlq_repeated = {job_id for job_id, n in dead_ids.items() if n > 1}
    dlq_missing = set(expect.dlq) - set(dead_ids)

    recover = _recover(obs, published, by_job)

    samples: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []

    def problem(name: str, ids: set[str], text: str) -> None:
        if ids:
            problems.append(f"{text}: {len(ids)} (e.g. {', '.join(_first(ids))})")
            samples[name] = _first(ids, 20)

    problem("lost", lost, "lost (confirmed, never answered, not in the DLQ)")
    problem("unexpected", unexpected, "unexpected (answered but never published)")
    problem("unflagged", unflagged, "executed or answered twice without a redelivered flag")
    problem("non_idempotent_twice", non_idempotent_twice, "non-idempotent job executed twice")
    problem("dlq_unexpected", dlq_unexpected, "in the DLQ, not expected there")
    problem("dlq_repeated", dlq_repeated, "in the DLQ more than once")
    problem("dlq_missing", dlq_missing, "expected in the DLQ, not there")
    if dead_without_id != expect.dlq_without_id:
        problems.append(
            f"DLQ messages without an id: {dead_without_id}, expected {expect.dlq_without_id}"
        )
    return Report(
        scenario=scenario,
        published=len(published),
        confirmed=len(confirmed),
        answered=len(answered),
        lost=len(lost),
        unexpected=len(unexpected),
        executed_twice=len(twice),
        answered_twice=len(answered_twice),
        flagged=len(flagged),
        non_idempotent_twice=len(non_idempotent_twice),
        dlq=len(obs.dead),
        dlq_expected=len(expect.dlq) + expect.dlq_without_id,
        recover_s=recover,
        problems=tuple(problems),
        samples=samples,
    )


def _recover(
    obs: Observation, published: dict[str, PublishedJob], by_job: dict[str, list[Answer]]
) -> float | None:
    """Worst time from a fault until every confirmed job published before it was answered."""
    if not obs.faults:
        return None
    first = {job_id: min(a.at for a in answers) for job_id, answers in by_job.items()}
    worst = 0.0
    for fault in obs.faults:
        before = [p.job_id for p in published.values() if p.confirmed and p.at < fault]
        for job_id in before:
            at = first.get(job_id)
            if at is None:
                if any(d.job_id == job_id for d in obs.dead):
                    continue  # dead-lettered without an answer: not waiting for one
                return math.inf
            worst = max(worst, at - fault)
    return worst


def assert_invariants(report: Report) -> None:
    """Raise `AssertionError` naming every invariant the run broke."""
    if report.problems:
        raise AssertionError(
            f"{report.scenario}: " + "; ".join(report.problems) + f"\n{header()}\n{report.row()}"
        )
