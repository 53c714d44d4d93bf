"""`python -m satellite` and the `satellite` command.

For `satellite serve`, the stop-signal recorder (poller/stopsignal.py) is installed before
`satellite.cli` and its libraries are imported (about 2 s on a loaded host): a SIGTERM that
lands on a replica while it is still starting is a requested stop (exit 0), not death (143).
"""

from __future__ import annotations

import sys

from poller import stopsignal


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        stopsignal.install()
    from satellite.cli import main as cli_main  # noqa: PLC0415 - after the recorder

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
