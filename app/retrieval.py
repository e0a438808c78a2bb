"""Retrieval for fusion: k neighbours per query from a memory, and the vectors to fuse.

Uni-modal search, cross-modal fusion is RECO's default: an image query searches the memory's images and fuses
their captions' text vectors; a text query searches captions and fuses their images. Both axes are switchable
(ablations), and so are the exclusions a training pair needs when it also sits in the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .store.base import Hit, VectorStore

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
    rows = search_hits(store, collection, queries, side, k, search=search, fusion=fusion, exclude=exclude,
                       dedup_threshold=dedup_threshold, score_threshold=score_threshold, with_vectors=True)
    b = len(queries)
    out = Neighbours(ids=[], vectors=np.zeros((b, k, dim), np.float32), scores=np.zeros((b, k), np.float32),
                     mask=np.zeros((b, k), bool))
    for i, row in enumerate(rows):
        out.ids.append([h.id for h in row])
        if row:
            n = len(row)
            out.vectors[i, :n] = np.stack([h.vector for h in row])
            out.scores[i, :n] = [h.score for h in row]
            out.mask[i, :n] = True
    return out


def search_hits(store: VectorStore, collection: str, queries: np.ndarray, side: str, k: int, *,
                search: str = "uni", fusion: str = "cross", exclude: Sequence[Iterable[str]] | None = None,
                dedup_threshold: float | None = None, score_threshold: float | None = None,
                with_vectors: bool = True) -> list[list[Hit]]:
    """The hits `retrieve` fuses: at most k per query, best first, after the exclusions and thresholds.

    with_vectors=False skips the fused vectors (hits carry ids and scores only): a caller that already holds the
    memory's vectors (training, when the pairs are the memory) saves converting k vectors per query.
    """
    using, fused = modes(side, search, fusion)
    queries = np.asarray(queries, dtype=np.float32)
    extra = 0 if dedup_threshold is None else max(k, 8)  # room for near-duplicates that will be dropped
    rows = store.search(collection, queries, using=using, k=k + extra, with_vector=fused if with_vectors else None,
                        exclude=[set(e) for e in exclude] if exclude is not None else None,
                        score_threshold=score_threshold, with_payload=False)
    if dedup_threshold is not None:
        rows = [[h for h in row if h.score <= dedup_threshold] for row in rows]
    return [row[:k] for row in rows]
