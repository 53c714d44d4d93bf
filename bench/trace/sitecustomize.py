"""Timestamps of one submit's steps in every process of `bench/core_submit.py --trace DIR`.

Imported by Python at start-up (`site`) when this directory is on `PYTHONPATH`; does nothing
unless `BENCH_SUBMIT_TRACE` names a directory. Then it wraps, as their modules are imported, the
functions a submit passes through (uvicorn's reads and response, the job service, the store,
the broker's publishes, confirms, socket reads and writes, the reply consumer, the poller's
delivery and result) to record `(time.perf_counter_ns(), event)`; each process appends its
events to `DIR/<pid>.tsv` every 500 and at exit. perf_counter is CLOCK_MONOTONIC on Linux: one
clock for all the processes of the host. A measuring aid for the bench, never loaded by the
service itself.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

_DIR = os.environ.get("BENCH_SUBMIT_TRACE")
_events: list[tuple[int, str]] = []
_clock = time.perf_counter_ns


def mark(event: str) -> None:
    _events.append((_clock(), event))
    if len(_events) >= 500:  # a process that ends with os._exit runs no atexit handler late
        _write()


def _write() -> None:
    if _DIR and _events:
        lines = "".join(f"{t}\t{name}\n" for t, name in _events)
        _events.clear()
        with Path(_DIR, f"{os.getpid()}.tsv").open("a") as out:
            out.write(lines)


def _around(cls: Any, name: str, before: str | None, after: str | None = None) -> None:
    original = getattr(cls, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        out = original(*args, **kwargs)
        if after:
            mark(after)
        return out

    setattr(cls, name, wrapped)


def _around_async(cls: Any, name: str, before: str | None, after: str | None) -> None:
    original = getattr(cls, name)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(before)
        try:
            return await original(*args, **kwargs)
        finally:
            if after:
                mark(after)

    setattr(cls, name, wrapped)


def _patch_broker(module: ModuleType) -> None:
    broker = module.Broker
    original = broker._publish

    def publish(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark("publish")
        future = original(self, *args, **kwargs)
        future.add_done_callback(lambda _f: mark("confirm"))
        return future

    broker._publish = publish
    _around(broker, "_on_message", "delivery")
    if hasattr(module, "_send_through"):  # a write-through (`BrokerOptions`); not in older sources
        _around(module, "_send_through", "amqp_send")


def _patch_pika_io(module: ModuleType) -> None:
    transport = module._AsyncPlaintextTransport
    _around(transport, "_produce", "amqp_send")
    _around(transport, "_consume", "amqp_read")


def _patch_uvicorn(module: ModuleType) -> None:
    _around(module.HttpToolsProtocol, "data_received", "http_read")
    cycle = module.RequestResponseCycle
    original = cycle.send

    async def send(self: Any, message: Any) -> None:
        await original(self, message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            mark("http_written")

    cycle.send = send


def _patch_jobs(module: ModuleType) -> None:
    _around_async(module.JobService, "submit", "submit", "submitted")
    _around_async(module.JobService, "_wait", None, "woken")


def _patch_replies(module: ModuleType) -> None:
    _around(module.Replies, "_on_delivery", "reply")


def _patch_api(module: ModuleType) -> None:
    _around_async(module, "_lean_submit", "route", None)
    _around_async(module, "_read_body", None, "body_read")


def _patch_access(module: ModuleType) -> None:
    _around_async(module.AccessLog, "__call__", "asgi", None)


def _patch_store(module: ModuleType) -> None:
    _around_async(module.Store, "record_queued", "queued_write", "queued_committed")


def _patch_worker(module: ModuleType) -> None:
    _around(module.Worker, "_on_delivery", "job_delivered")
    _around(module.Worker, "_publish_result", "result_publish")


_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "poller.broker": _patch_broker,
    "poller.worker": _patch_worker,
    "pika.adapters.utils.io_services_utils": _patch_pika_io,
    "uvicorn.protocols.http.httptools_impl": _patch_uvicorn,
    "satellite.service.jobs": _patch_jobs,
    "satellite.service.store": _patch_store,
    "satellite.service.replies": _patch_replies,
    "satellite.service.api.jobs": _patch_api,
    "satellite.service.api.access": _patch_access,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any, patch: Callable[[ModuleType], None]) -> None:
        self.inner = inner
        self.patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        patch = _PATCHES.get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, patch)
                return spec
        return None


if _DIR:
    sys.meta_path.insert(0, _Finder())
    atexit.register(_write)
