"""`reco serve`: the HTTP service's command. It lives with the service in app/serve/cli.py; this module is its
place among the nouns. Importing it loads only click and the command: the service loads when it starts."""

from __future__ import annotations

from ..serve.cli import serve

__all__ = ["serve"]
