"""`satellite call|submit` job options: the shared definitions of `poller.jobargs`, validated.

The options themselves (every kind's, their spelling, secrets from files and the environment)
live in `poller.jobargs`, shared with `poller exec` so that both commands take the same ones.
This module adds `job_from_args`, which validates them into a `JobRequest` with `build_job`.
"""

from __future__ import annotations

import argparse

from poller.jobargs import (
    KIND_OPTIONS,
    Environ,
    JobParts,
    KindOptions,
    SecretOption,
    add_job_arguments,
    job_parts,
    job_target,
    parse_varbind,
)
from poller.wire import JobKind, JobRequest
from satellite.dispatch import build_job

__all__ = [
    "KIND_OPTIONS",
    "JobParts",
    "KindOptions",
    "SecretOption",
    "add_job_arguments",
    "job_from_args",
    "parse_varbind",
]


def job_from_args(
    kind: JobKind | str, ns: argparse.Namespace, environ: Environ | None = None
) -> JobRequest:
    """Validate the options of `kind` into a job; raise `ConfigError` or `InvalidJobError`."""
    parts = job_parts(kind, ns, environ or {})
    return build_job(
        JobKind(kind),
        target=job_target(ns),
        auth=parts.auth,
        credential_ref=ns.credential_ref,
        params=parts.params,
        timeout=ns.job_timeout,
        not_after=ns.not_after,
        idempotent=ns.idempotent,
        meta=ns.meta,
        job_id=ns.job_id,
    )
