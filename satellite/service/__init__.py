"""The core service, `satellite serve` (DESIGN §10): listening, auth, store, ingest, API.

Needs the package extra `core` (`pip install 'satellite-poller[core]'`); the poller never
imports anything here.
"""
