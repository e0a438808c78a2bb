"""Retrieval for fusion: k neighbours per query from a memory, and the vectors to fuse.

Uni-modal search, cross-modal fusion is RECO's default: an image query searches the memory's images and fuses
their captions' text vectors; a text query searches captions and fuses their images. Both axes are switchable
(ablations), and so are the exclusions a training pair needs when it also sits in the memory.

Passing `device` (the model's torch device) and `settings` lets a search run exactly on that device instead of
the store where RECO_DEVICE_SEARCH allows it (app/device_search.py); the answer is the same either way.
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
             dedup_threshold: float | None = None, score_threshold: float | None = None,
             device: str | None = None, settings=None) -> Neighbours:
    """Batched kNN + the fused vectors of the hits.

    exclude[i]: point ids query i must not retrieve (a training pair's own item). dedup_threshold drops hits whose
    search score is above it (near-duplicates of the query: the same picture re-encoded, the same caption).
    score_threshold drops weak neighbours (noisy memories). device + settings: search on the device when enabled.
    """
    using, fused = modes(side, search, fusion)
    index = _device_index(store, collection, queries, device, settings, (using, fused))
    if index is not None:  # arrays all the way: no Hit per neighbour
        found = index.neighbours(queries, using, k, exclude, dedup_threshold, score_threshold)
        return Neighbours(ids=index.ids_of(found), vectors=index.vectors(fused, found), scores=found.scores,
                          mask=found.mask)
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
                with_vectors: bool = True, device: str | None = None, settings=None) -> list[list[Hit]]:
    """The hits `retrieve` fuses: at most k per query, best first, after the exclusions and thresholds.

    with_vectors=False skips the fused vectors (hits carry ids and scores only): a caller that already holds the
    memory's vectors (training, when the pairs are the memory) saves converting k vectors per query.
    device (the model's torch device) + settings (RECO_DEVICE_SEARCH; None: from the environment): search an
    exact copy of the version on that device where enabled. Equal scores then come in id order.
    """
    using, fused = modes(side, search, fusion)
    queries = np.asarray(queries, dtype=np.float32)
    index = _device_index(store, collection, queries, device, settings, (using, fused) if with_vectors else (using,))
    if index is not None:
        found = index.neighbours(queries, using, k, exclude, dedup_threshold, score_threshold)
        return index.hits(found, fused if with_vectors else None)
    extra = 0 if dedup_threshold is None else max(k, 8)  # room for near-duplicates that will be dropped
    excl = [set(e) for e in exclude] if exclude is not None else None
    window = k + extra  # the hits asked for; near-duplicates are dropped from these, then k kept

    def ask(rows_at: list[int], limit: int) -> list:
        found = store.search(collection, queries[rows_at], using=using, k=limit,
                             with_vector=fused if with_vectors else None,
                             exclude=[excl[i] for i in rows_at] if excl is not None else None,
                             score_threshold=score_threshold, with_payload=False)
        return [_first_in_id_order(row, window, limit) for row in found]

    # one hit beyond the window shows whether equal scores run past its end; only such rows ask again
    limit, todo = window + 1, list(range(len(queries)))
    rows: list = [None] * len(queries)
    while todo:
        for i, row in zip(todo, ask(todo, limit)):
            rows[i] = row
        todo = [i for i in todo if rows[i] is _MORE]
        limit *= 4
    if dedup_threshold is not None:
        rows = [[h for h in row if h.score <= dedup_threshold] for row in rows]
    return [row[:k] for row in rows]


_MORE = object()  # a row whose equal scores at the window's end may go on past the hits fetched


def _first_in_id_order(row: list[Hit], window: int, limit: int):
    """The first `window` hits of a store row with equal scores in point-id order, as the device index breaks
    them (neither store defines an order for them), or _MORE when the run of equal scores at the window's end
    reaches the last of the `limit` hits fetched (a full row: more of them may follow)."""
    row = sorted(row, key=lambda h: (-h.score, h.id))
    if len(row) == limit and row[window - 1].score == row[-1].score:
        return _MORE
    return row[:window]


def _device_index(store, collection, queries, device, settings, names):
    """The device index to search with, or None (the store): only when a device is given and settings allow."""
    if device is None:
        return None
    from .device_search import index_for

    if settings is None:
        from .settings import Settings

        settings = Settings.from_env()
    q = np.asarray(queries)
    return index_for(store, collection, device, settings, q.shape[-1], names)
