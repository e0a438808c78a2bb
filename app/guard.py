"""Leakage guard: keep copies of the evaluation images out of retrieval.

A memory that holds the test images themselves (as stored, re-encoded, resized or lightly cropped) would let
RECO look the answer up. A copy is found in two steps: its image embedding is among the nearest memory images
of an evaluation image (a cheap candidate filter), then its pixels, read again from the item's source, match the
evaluation image: a 32x32 colour thumbnail correlates above a threshold with the evaluation image or one of its
light crops. A different picture of the same concept (another vendor's drawing of the same emoji, another photo
of the species) does not match pixel for pixel and stays retrievable: that is the knowledge RECO is for.
Items whose source cannot be read (memories built from precomputed embeddings) are judged by a near-identical
embedding instead, and counted apart in the report.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

THUMB = 32
CROPS = (1.0, 0.95, 0.9, 0.85)
ANCHORS = ((0.5, 0.5), (0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0))


def thumbnail(image) -> np.ndarray:
    """Zero-mean, unit-norm colour thumbnail: the dot product of two is their pixel correlation (colour, since a
    green shape on a grey ground can vanish in grey levels)."""
    from PIL import Image

    a = np.asarray(image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.float64).ravel()
    a = a - a.mean()
    return a / (np.linalg.norm(a) + 1e-9)


def crop_thumbnails(image) -> np.ndarray:
    """Thumbnails of the image and of its light crops (a copy may be cropped: one of these lines up with it)."""
    w, h = image.size
    out = []
    for f in CROPS:
        cw, ch = int(w * f), int(h * f)
        for ax, ay in (ANCHORS if f < 1.0 else ANCHORS[:1]):
            x, y = int((w - cw) * ax), int((h - ch) * ay)
            out.append(thumbnail(image.crop((x, y, x + cw, y + ch))))
    return np.stack(out)


class LeakageGuard:
    def __init__(self, store, collection: str, enabled: bool = True, candidates: int = 20, min_score: float = 0.5,
                 pixel_threshold: float = 0.95, copy_cosine: float = 0.98):
        self.store, self.collection, self.enabled = store, collection, enabled
        self.candidates, self.min_score = candidates, min_score
        self.pixel_threshold, self.copy_cosine = pixel_threshold, copy_cosine
        self.excluded: set[str] = set()
        self.excluded_keys: set[str] = set()
        self.queries_with_copies = 0
        self.by_pixels = self.by_embedding = 0

    def find(self, image_embeddings: np.ndarray, load_image) -> set[str]:
        """Memory point ids that are copies of any evaluation image (none when the guard is off).

        load_image(i) returns evaluation image i; it is called only for images that have candidates."""
        from .corpus import read_source_images

        if not self.enabled:
            return set()
        rows = self.store.search(self.collection, image_embeddings, using="image", k=self.candidates,
                                 score_threshold=self.min_score, with_payload=True)
        sources = read_source_images({h.id: h.payload.get("src") for row in rows for h in row})
        thumbs = {pid: thumbnail(im) if im is not None else None for pid, im in sources.items()}
        for i, row in enumerate(rows):
            crops = None
            found = False
            for h in row:
                if thumbs[h.id] is not None:
                    if crops is None:
                        crops = crop_thumbnails(load_image(i))
                    copy = float((crops @ thumbs[h.id]).max()) >= self.pixel_threshold
                    self.by_pixels += copy
                else:
                    copy = h.score >= self.copy_cosine
                    self.by_embedding += copy
                if copy:
                    self.excluded.add(h.id)
                    self.excluded_keys.add(str(h.payload.get("key")))
                    found = True
            self.queries_with_copies += found
        return self.excluded

    def report(self) -> dict:
        return {"enabled": self.enabled, "excluded_items": len(self.excluded),
                "excluded_keys": sorted(self.excluded_keys)[:10_000],
                "queries_with_a_copy": self.queries_with_copies, "matched_by_pixels": self.by_pixels,
                "matched_by_embedding": self.by_embedding,
                "params": {"candidates": self.candidates, "min_score": self.min_score,
                           "pixel_threshold": self.pixel_threshold, "copy_cosine": self.copy_cosine}}
