"""Fault scenarios (issue 17): real pollers, the machine's broker, the shared checker.

Every scenario test is marked `faults` (CI runs the short version of every one) and runs its
pollers with the in-process lane (`IN_PROCESS_LANE`: no interactive jobs here); its `Report`
goes through the `fault_report` fixture, which prints the table at the end of the session and,
when `USM_FAULTS_REPORT` names a file, appends one JSON line per scenario to it
(bench/faults.py reads it for docs/reliability.md). `fault_node` is the private RabbitMQ node
that scenarios 4, 8 and 9 share (tests/faults/node.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.faults.checker import Report, header
from tests.faults.device import CountingAgent
from tests.faults.node import ADVANCED, FaultNode
from tests.support.netns import broker_link  # noqa: F401 - scenarios 6, 7: a poller's link
from tests.support.poller_proc import IN_PROCESS_LANE
from tests.support.rabbitmq_cluster import private_broker

_REPORTS: list[Report] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        if here in path.parents and path.name != "test_checker.py":
            item.add_marker(pytest.mark.faults)
            # The scenarios are about bulk jobs under faults: a lane process beside every
            # replica (restarted many times) would only cost time.
            item.add_marker(IN_PROCESS_LANE)


@pytest.fixture
def fault_report() -> Callable[[Report], None]:
    """Record a scenario's report for the session's table (and the bench's file)."""

    def record(report: Report) -> None:
        _REPORTS.append(report)
        path = os.environ.get("USM_FAULTS_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(report)) + "\n")

    return record


@pytest.fixture
def agent() -> Iterator[CountingAgent]:
    """The counting SNMP device, answering after 200 ms: many jobs are in flight when a fault
    hits."""
    with CountingAgent(delay=0.2) as device:
        yield device


@pytest.fixture(scope="package")
def shared_fault_node() -> Iterator[FaultNode]:
    """One private RabbitMQ node for scenarios 4, 8 and 9 (a start costs 5-20 s here)."""
    with private_broker(1, ADVANCED) as broker:
        yield FaultNode(broker)


@pytest.fixture
def fault_node(shared_fault_node: FaultNode) -> Iterator[FaultNode]:
    """The shared node, running with its defaults; reset again after the scenario."""
    shared_fault_node.reset()
    yield shared_fault_node
    shared_fault_node.reset()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _REPORTS:
        terminalreporter.write_sep("-", "fault scenarios")
        terminalreporter.write_line(header())
        for report in _REPORTS:
            terminalreporter.write_line(report.row())
