"""The core service, `satellite serve` (DESIGN §10): history store, result ingest and HTTP API.

Needs the package extra `core` (`pip install 'satellite-poller[core]'`); the poller never
imports anything here.
"""
