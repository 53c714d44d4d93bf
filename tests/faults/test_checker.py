"""The checker's arithmetic on hand-made runs: it must see a loss, a duplicate, a stray result."""

from __future__ import annotations

import math

import pytest

from tests.faults.checker import (
    Answer,
    DeadLetter,
    Expectation,
    Observation,
    PublishedJob,
    assert_invariants,
    check,
    header,
)


def jobs(
    *ids: str, confirmed: bool = True, at: float = 0.0, idempotent: bool = True
) -> list[PublishedJob]:
    return [PublishedJob(i, confirmed, at, idempotent) for i in ids]


def test_a_clean_run_has_no_problems() -> None:
    obs = Observation(
        published=jobs("a", "b", "c"),
        answers=[Answer("a", 1.0), Answer("b", 1.1), Answer("c", 1.2, status="error")],
    )
    report = check("clean", obs)
    assert report.ok
    assert (report.published, report.confirmed, report.answered, report.lost) == (3, 3, 3, 0)
    assert (report.unexpected, report.executed_twice, report.flagged) == (0, 0, 0)
    assert report.recover_s is None
    assert report.row() == "| clean | 3 | 3 | 3 | 0 | 0 | 0 | 0 | 0/0 | - |"
    assert header().count("|") == report.row().count("|") * 2
    assert_invariants(report)


def test_a_confirmed_job_without_an_answer_is_lost() -> None:
    obs = Observation(published=jobs("a", "b"), answers=[Answer("a", 1.0)])
    report = check("loss", obs)
    assert report.lost == 1
    assert report.answered == 1
    assert report.samples["lost"] == ("b",)
    with pytest.raises(AssertionError, match=r"lost .*: 1 \(e\.g\. b\)"):
        assert_invariants(report)


def test_an_unconfirmed_job_without_an_answer_is_not_lost() -> None:
    obs = Observation(
        published=[*jobs("a"), *jobs("b", confirmed=False)], answers=[Answer("a", 1.0)]
    )
    report = check("unconfirmed", obs)
    assert (report.published, report.confirmed, report.lost) == (2, 1, 0)
    assert report.ok


def test_a_dead_lettered_job_is_not_lost_when_expected_there() -> None:
    obs = Observation(published=jobs("a", "p"), answers=[Answer("a", 1.0)], dead=[DeadLetter("p")])
    assert check("poison", obs, Expectation(dlq=frozenset({"p"}))).ok
    report = check("poison", obs)
    assert report.lost == 0
    assert report.problems == ("in the DLQ, not expected there: 1 (e.g. p)",)


def test_dlq_missing_repeated_and_without_id() -> None:
    obs = Observation(
        published=jobs("a", "b"),
        answers=[Answer("a", 1.0), Answer("b", 1.0)],
        dead=[DeadLetter("a"), DeadLetter("a"), DeadLetter(None)],
    )
    report = check("dlq", obs, Expectation(dlq=frozenset({"a", "b"})))
    assert report.dlq == 3
    assert report.dlq_expected == 2
    assert len(report.problems) == 3
    assert any("more than once" in p for p in report.problems)
    assert any("expected in the DLQ, not there: 1 (e.g. b)" in p for p in report.problems)
    assert any("without an id: 1, expected 0" in p for p in report.problems)


def test_a_result_for_an_id_never_published_is_unexpected() -> None:
    obs = Observation(published=jobs("a"), answers=[Answer("a", 1.0), Answer("zz", 1.0)])
    report = check("stray", obs)
    assert report.unexpected == 1
    assert report.answered == 1
    assert not report.ok


def test_a_flagged_duplicate_is_allowed_and_counted() -> None:
    obs = Observation(
        published=jobs("a", "b"),
        answers=[
            Answer("a", 1.0),
            Answer("b", 1.0),
            Answer("a", 2.0, attempt=2, redelivered=True),
        ],
    )
    report = check("dup", obs)
    assert (report.executed_twice, report.answered_twice, report.flagged) == (1, 1, 1)
    assert report.ok


def test_a_duplicate_without_the_redelivered_flag_is_a_problem() -> None:
    obs = Observation(published=jobs("a"), answers=[Answer("a", 1.0), Answer("a", 2.0)])
    report = check("unflagged", obs)
    assert (report.executed_twice, report.flagged) == (1, 0)
    assert report.samples["unflagged"] == ("a",)
    assert not report.ok


def test_the_device_count_finds_an_execution_whose_answer_never_came() -> None:
    # Executed at the device twice, one answer (the second attempt's): allowed when flagged.
    obs = Observation(
        published=jobs("a"),
        answers=[Answer("a", 2.0, attempt=2, redelivered=True)],
        executions={"a": 2},
    )
    report = check("device", obs)
    assert (report.executed_twice, report.answered_twice, report.flagged) == (1, 0, 1)
    assert report.ok
    # ... but not when nothing says it was delivered again.
    obs.answers = [Answer("a", 2.0)]
    assert check("device", obs).samples["unflagged"] == ("a",)


def test_a_non_idempotent_job_executed_twice_is_a_problem() -> None:
    obs = Observation(
        published=jobs("set", idempotent=False),
        answers=[Answer("set", 1.0), Answer("set", 2.0, attempt=2, redelivered=True)],
    )
    report = check("set", obs)
    assert report.non_idempotent_twice == 1
    assert any("non-idempotent" in p for p in report.problems)


def test_outcome_unknown_is_not_an_execution() -> None:
    answers = [
        Answer("set", 1.0),
        Answer("set", 2.0, status="error", code="outcome_unknown", attempt=2, redelivered=True),
    ]
    obs = Observation(published=jobs("set", idempotent=False), answers=answers, executions={})
    report = check("set", obs)
    assert (report.executed_twice, report.answered_twice, report.non_idempotent_twice) == (0, 1, 0)
    assert report.flagged == 1
    assert report.ok
    # The device saw it twice: the results alone would have hidden it.
    obs.executions = {"set": 2}
    assert check("set", obs).non_idempotent_twice == 1


def test_time_to_recover_is_the_worst_fault_delay() -> None:
    obs = Observation(
        published=[
            PublishedJob("a", True, 0.0),
            PublishedJob("b", True, 0.5),
            PublishedJob("c", True, 5.0),
            PublishedJob("d", False, 5.0),
        ],
        answers=[Answer("a", 0.1), Answer("b", 3.5), Answer("c", 5.2)],
        faults=[1.0, 6.0],
    )
    report = check("recover", obs)
    assert report.recover_s == pytest.approx(2.5)  # b, published before the first fault
    assert report.row().endswith("| 2.5 |")
    obs.answers = obs.answers[:2]  # c never answered: it never recovered
    report = check("recover", obs)
    assert report.recover_s == math.inf
    assert report.lost == 1
    assert "| never |" in report.row()


def test_executed_twice_and_never_answered_is_for_the_dlq_check_not_the_flag_check() -> None:
    # A poison job's companion, run and killed again and again, then dead-lettered unanswered.
    obs = Observation(published=jobs("a"), executions={"a": 5}, dead=[DeadLetter("a")])
    report = check("unanswered", obs)
    assert (report.executed_twice, report.flagged, report.lost) == (1, 0, 0)
    assert report.problems == ("in the DLQ, not expected there: 1 (e.g. a)",)
