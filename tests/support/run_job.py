"""Run ICMP/TCP jobs through the real runner and drivers in this process; print the results.

Used by tests that need another network namespace or fewer privileges than the test process:
`ip netns exec NS [setpriv ...] python -m tests.support.run_job JOB_JSON...`. Stdout gets one
JSON object, `{"modes": {family: mode}, "results": [JobResult, ...]}`; logs go to stderr as
JSON lines. Jobs run concurrently.
"""

from __future__ import annotations

import asyncio
import json
import sys

from poller import wire
from poller.config import PollerSettings
from poller.credentials import CredentialStore
from poller.drivers.icmp import IcmpDriver
from poller.drivers.tcp import TcpDriver
from poller.logging import configure_logging
from poller.runner import Runner


async def _main(bodies: list[str]) -> str:
    settings = PollerSettings(amqp_dsn="amqp://127.0.0.1/", satellite_id="netns")
    icmp = IcmpDriver.from_settings(settings)
    tcp = TcpDriver.from_settings(settings)
    runner = Runner(
        drivers={"icmp.ping": icmp, "tcp.connect": tcp},
        credentials=CredentialStore(),
        satellite_id="netns",
        worker="run_job",
    )
    jobs = [wire.decode_job(body.encode()) for body in bodies]
    results = await asyncio.gather(*(runner.run(job) for job in jobs))
    return json.dumps(
        {
            "modes": {family.name: mode.value for family, mode in icmp.modes.items()},
            "results": [json.loads(wire.encode(result)) for result in results],
        }
    )


def main() -> int:
    configure_logging("json", "info", sys.stderr)
    print(asyncio.run(_main(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
