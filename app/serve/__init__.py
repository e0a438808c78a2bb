"""RECO over HTTP: `reco serve` (FastAPI + uvicorn). A room of its own: it uses the library, which never imports it.

Importing this package is cheap; FastAPI, uvicorn and torch load when the server starts.
"""
