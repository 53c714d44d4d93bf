"""Atheris harness for `poller.wire.decode_job` (scenario 13 of issue 17).

`python -m tests.faults.fuzz_decode -runs=N` (or `-max_total_time=S`, any libFuzzer option)
feeds mutated bytes to `decode_job`; anything but `WireError` or a valid job, or one input
that takes more than 100 ms of CPU, stops the run with a non-zero exit. Seeds: a few valid jobs.
"""

from __future__ import annotations

import contextlib
import sys
import time

import atheris

with atheris.instrument_imports():
    from poller import wire
    from poller.errors import WireError

#: CPU seconds one input may take.
SLOW = 0.1
#: `USM_POLLER_MAX_JOB_BYTES`'s default.
MAX_JOB_BYTES = 262_144


def one_input(data: bytes) -> None:
    started = time.thread_time()
    with contextlib.suppress(WireError):
        wire.decode_job(data, max_bytes=MAX_JOB_BYTES)
    took = time.thread_time() - started
    if took > SLOW:
        raise AssertionError(f"decode_job took {took * 1000:.0f} ms of CPU on {len(data)} bytes")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
