"""Moving things between RECO installs: memory versions out and in (clip-retrieval's layout plus a manifest).

A room of its own: it uses the library (store, memory, build), which never imports it.
"""

from pathlib import Path

from ..errors import RecoError


def new_directory(out: str | Path) -> Path:
    """`out`, which must not exist or be an empty directory: an export never mixes with other files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecoError(f"{out} exists and is not an empty directory: export into a new one")
    return out
