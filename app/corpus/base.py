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
    MISSING_KEY = "missing_key"  # --key-column given, the row has no value there (null, absent or blank)
    CAPTION_TOO_LONG = "caption_too_long"  # over MAX_CAPTION_CHARS
    FORGOTTEN = "forgotten"  # taken down from every version of the memory (`reco memory forget --all-versions`)
    REMOVED = "removed"  # a delta's parent item whose key the delta removes (`--remove-keys`)
    UPDATED = "updated"  # a delta's parent item replaced by the delta's item of the same key


# CLIP reads a caption's first 77 tokens (about 300 characters); the memory keeps the whole caption for queries
# and exports, so a scraped page of text would weigh on every answer that returns it. Longer captions are skipped.
MAX_CAPTION_CHARS = 10_000


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

    def __post_init__(self) -> None:  # here, so every reader keeps the one caption limit
        if self.skip is None and self.caption is not None and len(self.caption) > MAX_CAPTION_CHARS:
            self.skip = SkipReason.CAPTION_TOO_LONG


def clean_caption(text: str | None) -> str | None:
    if text is None:
        return None
    text = str(text).strip()
    return text or None
