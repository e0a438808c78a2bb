"""What a reader yields: one image-text pair, or the reason it must be skipped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class SkipReason:
    CORRUPT_IMAGE = "corrupt_image"
    MISSING_IMAGE = "missing_image"  # no image member / file not found
    EMPTY_CAPTION = "empty_caption"  # missing or blank caption
    UNSAFE_PATH = "unsafe_path"  # a tar member whose path leaves the archive
    DUPLICATE_KEY = "duplicate_key"
    BAD_EMBEDDING = "bad_embedding"  # non-finite or zero vector


@dataclass
class Item:
    key: str
    caption: str | None = None
    image_bytes: bytes | None = None
    image_emb: np.ndarray | None = None
    text_emb: np.ndarray | None = None
    skip: str | None = None  # set when the reader already knows the item is unusable
    extra: dict | None = None
    src: dict | None = None  # where the image can be read again: {"path": file} or {"tar": file, "member": name}


def clean_caption(text: str | None) -> str | None:
    if text is None:
        return None
    text = str(text).strip()
    return text or None
