"""The core service's broker names come from poller/wire.py and follow DESIGN §3."""

from __future__ import annotations

from poller import wire


def test_the_history_queue_follows_the_design() -> None:
    assert wire.history_queue() == "usm_poller.history"
    assert wire.history_binding_keys() == ("result.#", "reply.#")
    assert wire.history_queue_arguments() == {"x-queue-type": "quorum"}
    # A reply to any RPC caller matches the history's `reply.#` as well as the caller's key.
    assert wire.reply_routing_key("7", "core-a").startswith("reply.")


def test_a_job_queue_name_gives_its_satellite_and_nothing_else_does() -> None:
    assert wire.satellite_of_jobs_queue(wire.jobs_queue("sat-7")) == "sat-7"
    assert wire.satellite_of_jobs_queue(wire.dead_letter_queue("sat-7")) is None
    assert wire.satellite_of_jobs_queue(wire.history_queue()) is None
    assert wire.satellite_of_jobs_queue("usm_poller-sat-") is None
