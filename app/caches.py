"""Training's on-disk caches (the pairs read from a memory version, the neighbours found in one), under
RECO_HOME/cache/<kind>/<digest of the key>. Each records its key beside it, so a takedown can find and drop every
cache built from a version it changed (a cache whose key is unknown is dropped too: it is only a cache)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable

KINDS = ("pairs", "neighbours")
KEY_FILE = "key.json"


def cache_dir(home: Path, kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(home) / "cache" / kind / digest


def open_dir(d: Path, key: dict) -> Path:
    """Create a cache directory and record what it was built from."""
    d.mkdir(parents=True, exist_ok=True)
    (d / KEY_FILE).write_text(json.dumps(key, sort_keys=True))
    return d


def drop_built_from(home: Path, collections: Iterable[str]) -> int:
    """Remove every cache whose key names one of `collections` (or records no key); returns how many."""
    names = {str(c) for c in collections}
    dropped = 0
    for kind in KINDS:
        root = Path(home) / "cache" / kind
        for d in sorted(root.glob("*")) if root.is_dir() else []:
            try:
                key = json.loads((d / KEY_FILE).read_text())
            except (OSError, ValueError):
                key = None
            if key is None or names & set(_strings(key)):
                shutil.rmtree(d, ignore_errors=True)
                dropped += 1
    return dropped


def _strings(x) -> Iterable[str]:
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _strings(v)
