"""A full state dir (the container's tmpfs, or a full disk): the real `poller run` keeps
consuming, warns once a minute rather than at every 2 s rewrite of its health file, and
`poller check` says the file system is full instead of "poller not running".

The file system is a 32 KiB tmpfs, filled up, in a mount namespace of the test's own (`unshare
--mount`): nothing on the machine sees it, and it goes away with the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.rabbitmq import AmqpVhost

pytestmark = pytest.mark.integration

SCRIPT = r"""
set -u
mount -t tmpfs -o size=32k tmpfs "$FS" || exit 97
head -c 1048576 /dev/zero > "$FS/filler" 2>/dev/null
"$PY" -m poller run > "$LOG" 2>&1 &
pid=$!
i=0
while [ $i -lt 150 ] && ! grep -q broker_connected "$LOG"; do sleep 0.1; i=$((i+1)); done
sleep 5  # two or three more rewrites of the health file, all failing
"$PY" -m poller check > "$CHECK" 2>&1
echo "rc=$?" >> "$CHECK"
kill -TERM $pid
wait $pid
echo "poller_rc=$?" >> "$CHECK"
"""


@pytest.mark.timeout(90)
def test_a_full_state_dir_is_one_warning_and_check_says_it_is_full(
    amqp_vhost: AmqpVhost, tmp_path: Path
) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs unshare (util-linux) and root for a private tmpfs")
    fs = tmp_path / "fs"
    fs.mkdir()
    log, check = tmp_path / "poller.log", tmp_path / "check.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("USM_POLLER_", "US_AMQP"))}
    env |= {
        "FS": str(fs),
        "PY": sys.executable,
        "LOG": str(log),
        "CHECK": str(check),
        "US_AMQP_DSN": amqp_vhost.dsn,
        "USM_POLLER_SATELLITE_ID": "full-state-dir",
        "USM_POLLER_STATE_DIR": str(fs / "state"),
        "USM_POLLER_LOG_FORMAT": "json",
    }
    done = subprocess.run(
        [unshare, "--mount", "--propagation", "private", "--", "sh", "-c", SCRIPT],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "broker_connected" in events, log.read_text()
    # At least three failed rewrites, one warning.
    # One warning per health file: the replica's, and its lane process's (lane-health.json).
    warnings = [line for line in lines if line["event"] == "health_file_not_written"]
    paths = [Path(w["path"]).name for w in warnings]
    assert sorted(paths) == sorted(set(paths)), warnings
    [warning] = [w for w in warnings if Path(w["path"]).name == "health.json"]
    assert warning["error"] == "No space left on device"
    out = check.read_text()
    assert "rc=1" in out
    assert "file system is full" in out, out
    assert "USM_POLLER_STATE_DIR" in out
    assert "poller_rc=0" in out  # it drained and stopped as usual
