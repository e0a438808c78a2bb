"""Retrieval for fusion: k neighbours per query from a memory, and the vectors to fuse.

Uni-modal search, cross-modal fusion is RECO's default: an image query searches the memory's images and fuses
their captions' text vectors; a text query searches captions and fuses their images. Both axes are switchable
(ablations), and so are the exclusions a training pair needs when it also sits in the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .store.base import VectorStore

SEARCH_MODES = ("uni", "cross")
FUSION_MODES = ("cross", "uni")


def other(modality: str) -> str:
    return "text" if modality == "image" else "image"


@dataclass
class Neighbours:
    """k slots per query; slots past the available hits are masked out (mask False, zero vector, score 0)."""

    ids: list[list[str]]
    vectors: np.ndarray  # [B, k, D] float32
    scores: np.ndarray  # [B, k] float32
    mask: np.ndarray  # [B, k] bool

    @property
    def k(self) -> int:
        return self.scores.shape[1]


def modes(side: str, search: str = "uni", fusion: str = "cross") -> tuple[str, str]:
    """(vector searched, vector fused) for a query of modality `side`."""
    if side not in ("image", "text"):
        raise ValueError(f"side must be image or text, got {side!r}")
    if search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
    if fusion not in FUSION_MODES:
        raise ValueError(f"fusion must be one of {FUSION_MODES}, got {fusion!r}")
    using = side if search == "uni" else other(side)
    fused = other(side) if fusion == "cross" else side
    return using, fused


def retrieve(store: VectorStore, collection: str, queries: np.ndarray, side: str, k: int, *, dim: int,
             search: str = "uni", fusion: str = "cross", exclude: Sequence[Iterable[str]] | None = None,
             dedup_threshold: float | None = None, score_threshold: float | None = None) -> Neighbours:
    """Batched kNN + the fused vectors of the hits.

    exclude[i]: point ids query i must not retrieve (a training pair's own item). dedup_threshold drops hits whose
    search score is above it (near-duplicates of the query: the same picture re-encoded, the same caption).
    score_threshold drops weak neighbours (noisy memories).
    """
    using, fused = modes(side, search, fusion)
    queries = np.asarray(queries, dtype=np.float32)
    b = len(queries)
    extra = 0 if dedup_threshold is None else max(k, 8)  # room for near-duplicates that will be dropped
    rows = store.search(collection, queries, using=using, k=k + extra, with_vector=fused,
                        exclude=[set(e) for e in exclude] if exclude is not None else None,
                        score_threshold=score_threshold, with_payload=False)
    out = Neighbours(ids=[], vectors=np.zeros((b, k, dim), np.float32), scores=np.zeros((b, k), np.float32),
                     mask=np.zeros((b, k), bool))
    for i, row in enumerate(rows):
        if dedup_threshold is not None:
            row = [h for h in row if h.score <= dedup_threshold]
        row = row[:k]
        out.ids.append([h.id for h in row])
        for j, h in enumerate(row):
            out.vectors[i, j] = h.vector
            out.scores[i, j] = h.score
            out.mask[i, j] = True
    return out
