"""Image-text retrieval sets: `karpathy:FILE.json`, the Karpathy split JSON used for COCO and Flickr30k."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RecoError
from ..textfile import read_text
from .base import RetrievalSet


def karpathy(path: str, images_root: str | None = None, split: str = "test") -> RetrievalSet:
    p = Path(path)
    if not p.is_file():
        raise RecoError(f"Karpathy split file {path} not found")
    try:
        data = json.loads(read_text(p))
    except ValueError as exc:
        raise RecoError(f"{path} is not JSON: {exc}") from exc
    root = Path(images_root) if images_root else p.parent
    images, captions = [], []
    for img in data.get("images", []):
        if img.get("split") != split:
            continue
        images.append(str(root / img.get("filepath", "") / img["filename"]))
        captions.append([s["raw"] for s in img["sentences"]])
    if not images:
        raise RecoError(f"{path} has no images in split {split!r}")
    return RetrievalSet(f"karpathy:{p.stem}", images, captions)
