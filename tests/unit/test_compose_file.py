"""compose.yaml passes on what the core hands a site: every line `satellite provision` prints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from satellite import render
from satellite.provision import Provisioned, satellite_permissions

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_satellite_provision_prints_reaches_the_replicas(
    capsys: pytest.CaptureFixture[str],
) -> None:
    done = Provisioned(
        satellite_id="7",
        user="sat-7",
        created=True,
        password_set=True,
        permissions=satellite_permissions("7"),
        max_connections=16,
        max_channels=64,
        dsn="amqp://sat-7:pw@core.example:5672/%2f",
    )
    render.provisioned(done, vhost="/")
    printed = re.findall(r"^([A-Z_]+)=", capsys.readouterr().out, re.MULTILINE)
    assert printed == ["US_AMQP_DSN", "USM_POLLER_SATELLITE_ID", "USM_POLLER_DECLARE"]
    compose: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    environment: dict[str, str] = compose["services"]["poller"]["environment"]
    for name in printed:
        # Put in .env, a variable reaches a container only through `environment:`.
        assert str(environment.get(name, "")).startswith("${" + name), name
    # Without it in .env, the poller declares as before (a lab, an all-powerful user).
    assert environment["USM_POLLER_DECLARE"] == "${USM_POLLER_DECLARE:-true}"
