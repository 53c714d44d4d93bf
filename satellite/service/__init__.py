"""The core service, `satellite serve` (DESIGN §10): listening, auth, store, ingest, API."""
