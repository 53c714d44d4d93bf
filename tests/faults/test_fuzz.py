"""Scenario 13 of issue 17: `decode_job` under fuzzing.

Hypothesis builds valid jobs and breaks them (truncated, bytes flipped, fields replaced, nested
deeply, padded); atheris mutates bytes for a fixed budget. Either way `decode_job` returns a job
or raises `WireError`, never anything else, and never takes more than 100 ms of CPU on one input.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller import wire
from poller.errors import WireError
from tests import strategies
from tests.faults.harness import LONG

SLOW = 0.1  # CPU seconds one input may take
MAX_JOB_BYTES = 262_144


def _decode(raw: bytes) -> None:
    """Decode, and fail when the input costs more than `SLOW` of CPU on each of three tries (a
    garbage collection of the test process can land in one call; a slow input is slow always)."""
    took = []
    for _ in range(3):
        started = time.thread_time()
        with contextlib.suppress(WireError):
            wire.decode_job(raw, max_bytes=MAX_JOB_BYTES)
        took.append(time.thread_time() - started)
        if took[-1] < SLOW:
            return
    assert min(took) < SLOW, f"{min(took) * 1000:.0f} ms of CPU on {len(raw)} bytes"


@st.composite
def broken_jobs(draw: st.DrawFn) -> bytes:
    job: dict[str, Any] = draw(strategies.job_dicts())
    how = draw(st.sampled_from(["field", "truncate", "flip", "nest", "pad", "dup"]))
    if how == "field":
        key = draw(st.sampled_from([*job, "extra", "v"]))
        job[key] = draw(strategies.json_values)
    raw = json.dumps(job).encode()
    if how == "truncate":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif how == "flip":
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    elif how == "nest":
        depth = draw(st.integers(1, 5000))
        raw = raw[:-1] + b', "meta": ' + b"[" * depth + b"]" * depth + b"}"
    elif how == "pad":
        raw = raw[:-1] + b', "meta": {"p": "' + b"x" * draw(st.integers(0, 300_000)) + b'"}}'
    elif how == "dup":
        raw = raw[:-1] + b", " + raw[1:]
    return raw


@given(broken_jobs())
@settings(
    max_examples=2000 if LONG else 300,
    deadline=None,  # timed as CPU time above: wall time flakes on a shared machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_broken_jobs_only_raise_wire_error_and_are_fast(raw: bytes) -> None:
    _decode(raw)


@given(st.binary(max_size=4096))
@settings(max_examples=3000 if LONG else 500, deadline=None)
def test_random_bytes_only_raise_wire_error_and_are_fast(raw: bytes) -> None:
    _decode(raw)


SEEDS = (
    b'{"v":1,"id":"a","kind":"snmp.get","target":{"host":"10.0.0.1"},'
    b'"auth":{"version":"2c","community":"x"},"params":{"oids":["1.3.6.1.2.1.1.5.0"]}}',
    b'{"v":1,"id":"b","kind":"ssh.exec","target":{"host":"h","port":22},'
    b'"credential_ref":"r","params":{"commands":["show version"]},"timeout":5}',
    b'{"v":1,"id":"c","kind":"icmp.ping","target":{"host":"::1"},"params":{"count":1},'
    b'"not_after":"2026-01-01T00:00:00Z","idempotent":false,"meta":{"k":[1,2]}}',
)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (it has wheels for CPython 3.11 on x86_64 Linux only)",
)
def test_atheris_finds_nothing_in_a_fixed_budget(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n, seed in enumerate(SEEDS):
        (corpus / f"seed{n}").write_bytes(seed)
    runs = 300_000 if LONG else 30_000
    done = subprocess.run(
        [sys.executable, "-m", "tests.faults.fuzz_decode", f"-runs={runs}", str(corpus)],
        capture_output=True,
        text=True,
        timeout=1200 if LONG else 180,
        check=False,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Done {runs} runs" in done.stderr
