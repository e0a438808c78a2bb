"""Exact kNN on a device-resident copy of a memory version (RECO_DEVICE_SEARCH).

On a GPU, the store's CPU HNSW search took 80 % of an `encode_image` call; an exact matmul + top-k over the whole
version on the model's device is both faster and exact. The store stays the source of truth: a `DeviceIndex` is
read from it once per version (`store.scan_vectors`), cached process-wide per store and collection, and dropped
when another version of the same memory is loaded, or when asked (`drop`; RecoEncoder does on a swap and close).

Results equal the store's exact search (a collection under the full-scan threshold, or `exact` search), with one
documented difference: equal scores. Qdrant orders hits by score only (`ScoredPointOffset`'s Ord compares the
score; its top-k heap leaves equal scores in an order set by internal offsets and heap state, which change with
segments and optimisation: measured, neither id nor insertion order), and qdrant-client's local mode sorts with a
non-stable `np.argsort`. Here equal scores are broken by point id, ascending, so the answer is deterministic; where
equal scores straddle the k-th place, the store may return any of them and this index returns the lowest ids.

On CUDA the candidates come from an fp16 matmul (about 1e-3 off) and are rescored in fp32; a row whose fp32 k-th
score is not clear of the fp16 floor by the fp16 error bound is searched again in fp32, so ids are exact. On the
CPU everything is fp32.
"""

from __future__ import annotations

import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .errors import RecoError
from .store.base import MODALITIES, Hit, VectorStore, needs_graph

SCORE_BUFFER_BYTES = 1 << 30  # scores of one chunk of queries against every point ([chunk, N] float32)
SAFETY = 0.8  # share of the free device memory the index and the score buffer may take under `auto`
# |fp16 score - fp32 score| for unit vectors: each element rounded at 2^-11 relative (query and point: 2 x) plus
# the fp16 result's rounding (1 x) = 1.5e-3; doubled for accumulation order
FP16_ERROR = 3e-3
LOAD_BATCH = 4096  # points per scroll while loading
MIN_EXTRA = 16  # candidates beyond the limit taken from the fast matmul


def index_bytes(points: int, dim: int, names: int = len(MODALITIES), device: str = "cuda") -> int:
    """Device memory of a version's index: fp32 vectors per name (exact scores, fused vectors), plus an fp16
    copy per name on CUDA (the candidate matmul)."""
    per = 6 if str(device).startswith("cuda") else 4
    return points * dim * per * names


def use_device_search(settings, device: str, points: int, dim: int) -> bool:
    """Whether a model on `device` searches a version of `points` x `dim` on the device instead of the store.

    RECO_DEVICE_SEARCH=off: never. on: always, on the CPU too (tests; small memories; a wish to avoid HNSW's
    approximation). auto: only on CUDA (there the store's CPU search is the bottleneck; on a CPU the store's HNSW
    graph beats a full matmul) and only when the index plus the score buffer fit in SAFETY of the free device
    memory (`torch.cuda.mem_get_info`), so a big memory falls back to the store instead of running out.
    """
    mode = settings.device_search
    if mode == "off":
        return False
    if mode == "on":
        return True
    if not str(device).startswith("cuda"):
        return False
    free = _free_bytes(device)
    return index_bytes(points, dim, device=device) + SCORE_BUFFER_BYTES <= SAFETY * free


def _free_bytes(device: str) -> int:
    import torch

    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def _machine_device(settings) -> str:
    """The device a model on this machine would pick (app.backbone.pick_device without its checks)."""
    if settings.device and settings.device != "auto":
        return settings.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def where(settings, device: str | None, store: VectorStore, collection: str, points: int, dim: int) -> str:
    """Where searches of `collection` run, in words: "device (cuda, exact)", "store (hnsw)" or "store (exact)".
    device None: what a model on this machine would use (reco memory show)."""
    slot = _peek(store, collection)
    if slot is not None and slot.index is not None:
        return f"device ({slot.index.device_type}, exact)"
    if settings.device_search != "off" and (slot is None or not slot.declined):
        device = device or _machine_device(settings)
        if use_device_search(settings, device, points, dim):
            return f"device ({str(device).split(':')[0]}, exact)"
    local = getattr(store, "url", None) == ":memory:" or str(getattr(store, "url", "")).startswith("path:")
    return "store (exact)" if local or not needs_graph(points, dim) else "store (hnsw)"


@dataclass
class Found:
    """k slots per query, best first; slots past the hits are masked (row -1, score 0)."""

    rows: np.ndarray  # [B, k] int64 rows of the index
    scores: np.ndarray  # [B, k] float32
    mask: np.ndarray  # [B, k] bool


class DeviceIndex:
    """One version's vectors on a torch device, searched exactly. Read-only once loaded: searches from several
    threads share it; loading another name takes the index's lock."""

    def __init__(self, collection: str, device: str):
        self.collection, self.device = collection, str(device)
        self.device_type = self.device.split(":")[0]
        self.ids: list[str] = []
        self.dim = 0
        self.scans = 0  # how many times the store was read (tests count them)
        self._full: dict = {}  # name -> fp32 [N, D]
        self._half: dict = {}  # name -> fp16 [N, D] (CUDA)
        self._rank: np.ndarray | None = None  # tie-break: each row's place in id order
        self._row: dict[str, int] | None = None
        self._lock = threading.Lock()

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._full)

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, store: VectorStore, collection: str, names: Sequence[str], device: str) -> "DeviceIndex":
        index = cls(collection, device)
        index.ensure(store, names)
        return index

    def ensure(self, store: VectorStore, names: Iterable[str]) -> None:
        """Load the names not loaded yet, in one scan. Each batch goes straight into a preallocated tensor: the
        host holds one batch at a time, never a second copy of the version."""
        missing = [n for n in dict.fromkeys(names) if n not in self._full]
        if not missing:
            return
        with self._lock:
            missing = [n for n in missing if n not in self._full]
            if missing:
                try:
                    self._scan(store, missing)
                except RuntimeError as exc:  # torch's out-of-memory errors are RuntimeErrors
                    if "out of memory" not in str(exc).lower():
                        raise
                    raise RecoError(f"memory {self.collection} does not fit in {self.device} memory for exact "
                                    "search; set RECO_DEVICE_SEARCH=auto or off") from exc

    def _scan(self, store: VectorStore, names: list[str]) -> None:
        import torch

        first = not self.ids
        n = store.count(self.collection) if first else self.n
        out: dict = {}
        ids: list[str] = []
        at = 0
        self.scans += 1
        for batch_ids, vectors, _ in store.scan_vectors(self.collection, names, batch=LOAD_BATCH):
            if not out:
                self.dim = self.dim or vectors[names[0]].shape[1]
                out = {name: torch.empty((n, self.dim), dtype=torch.float32, device=self.device) for name in names}
            m = len(batch_ids)
            if at + m > n:
                raise RecoError(f"memory {self.collection} grew while it was read for device search; retry")
            if first:
                rows = slice(at, at + m)
                ids += batch_ids
            else:
                row_of = self.row_map()
                try:
                    rows = torch.as_tensor([row_of[i] for i in batch_ids], device=self.device)
                except KeyError as exc:
                    raise RecoError(f"memory {self.collection} changed while it was read; retry") from exc
            for name in names:
                out[name][rows] = torch.from_numpy(vectors[name]).to(self.device)
            at += m
        if at != n:
            raise RecoError(f"memory {self.collection} holds {at} points, counted {n}; run `reco memory verify`")
        if first:
            self.ids = ids
            order = sorted(range(n), key=ids.__getitem__)
            self._rank = np.empty(n, np.int64)
            self._rank[order] = np.arange(n)
        for name in names:
            if self.device_type == "cuda":
                self._half[name] = out[name].half()
            self._full[name] = out[name]

    def row_map(self) -> dict[str, int]:
        if self._row is None:
            self._row = {pid: i for i, pid in enumerate(self.ids)}
        return self._row

    # -- search ------------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, using: str, limit: int, exclude: Sequence[Iterable[str]] | None = None,
               score_threshold: float | None = None) -> Found:
        """What `store.search` returns, as arrays: at most `limit` hits per query, best first (ties by id),
        without the excluded ids, keeping scores above `score_threshold` (strictly, as both stores do)."""
        import torch

        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        b = len(q)
        if b == 0 or self.n == 0 or limit <= 0:
            shape = (b, max(limit, 0))
            return Found(np.full(shape, -1, np.int64), np.zeros(shape, np.float32), np.zeros(shape, bool))
        if q.shape[1] != self.dim:
            raise RecoError(f"queries of dimension {q.shape[1]} against memory {self.collection} of {self.dim}")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)  # cosine, as the store
        full = self._full[using]
        fast = self._half.get(using, full)
        half = fast is not full
        err = FP16_ERROR if half else 0.0
        c = min(self.n, limit + max(limit, MIN_EXTRA))
        chunk = max(1, SCORE_BUFFER_BYTES // (self.n * 4))
        excluded = self._excluded(exclude, b)
        rows, scores, floor = [], [], []
        with torch.no_grad():
            qt = torch.from_numpy(q).to(self.device)
            for a in range(0, b, chunk):
                qa = qt[a:a + chunk]
                s = qa.to(fast.dtype) @ fast.T
                self._mask(s, excluded, a, len(qa))
                vals, idx = torch.topk(s, c, dim=1)
                exact = torch.einsum("bd,bcd->bc", qa, full[idx]) if half else vals
                exact = exact.float().masked_fill(torch.isneginf(vals), float("-inf"))
                rows.append(idx.cpu().numpy())
                scores.append(exact.cpu().numpy())
                floor.append(vals[:, -1].float().cpu().numpy())
        rows, scores, floor = np.concatenate(rows), np.concatenate(scores), np.concatenate(floor)
        order = np.lexsort((self._rank[rows], -scores), axis=1)
        rows, scores = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
        if c < self.n:  # every point a candidate: nothing else can belong
            kth = scores[:, limit - 1]
            unsure = np.flatnonzero(~(kth > floor + err) & np.isfinite(floor))
            for i in unsure:
                rows[i, :limit], scores[i, :limit] = self._exact_row(qt[i], using, limit, kth[i], excluded, i)
        if c < limit:  # fewer points than asked for: empty slots, as the store's shorter rows
            rows = np.pad(rows, ((0, 0), (0, limit - c)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, limit - c)), constant_values=-np.inf)
        rows, scores = rows[:, :limit], scores[:, :limit]
        keep = np.isfinite(scores)
        if score_threshold is not None:
            keep &= scores > score_threshold
        return Found(np.where(keep, rows, -1), np.where(keep, scores, 0).astype(np.float32), keep)

    def _excluded(self, exclude, b: int) -> list[np.ndarray] | None:
        if exclude is None:
            return None
        row_of = self.row_map()
        out = [np.fromiter((row_of[x] for x in (e or ()) if x in row_of), np.int64) for e in exclude]
        return out if any(len(e) for e in out) else None

    def _mask(self, s, excluded, a: int, m: int) -> None:
        import torch

        if excluded is None:
            return
        part = excluded[a:a + m]
        qi = np.concatenate([np.full(len(e), i, np.int64) for i, e in enumerate(part)])
        if not len(qi):
            return
        ri = np.concatenate(part)
        s[torch.from_numpy(qi).to(s.device), torch.from_numpy(ri).to(s.device)] = float("-inf")

    def _exact_row(self, q, using: str, limit: int, kth: float, excluded, i: int):
        """One query's top `limit` in fp32 over every point: the rare row whose candidates could not prove it
        (ties at the k-th place, or an fp16 near miss). Every point at or above the candidates' k-th score."""
        import torch

        s = (q[None, :] @ self._full[using].T)[0]
        if excluded is not None and len(excluded[i]):
            s[torch.from_numpy(excluded[i]).to(s.device)] = float("-inf")
        at = torch.nonzero(s >= float(kth)).flatten()
        rows, scores = at.cpu().numpy(), s[at].float().cpu().numpy()
        order = np.lexsort((self._rank[rows], -scores))[:limit]
        out_r, out_s = np.full(limit, -1, np.int64), np.full(limit, -np.inf, np.float32)
        out_r[:len(order)], out_s[:len(order)] = rows[order], scores[order]
        return out_r, out_s

    def neighbours(self, queries: np.ndarray, using: str, k: int, exclude=None, dedup_threshold: float | None = None,
                   score_threshold: float | None = None) -> Found:
        """`retrieval.search_hits` on the device: the same k + extra hits asked of the store, near-duplicates
        (score above dedup_threshold) dropped, then the first k."""
        extra = 0 if dedup_threshold is None else max(k, 8)
        found = self.search(queries, using, k + extra, exclude, score_threshold)
        keep = found.mask if dedup_threshold is None else found.mask & (found.scores <= dedup_threshold)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        keep = np.take_along_axis(keep, order, 1)
        return Found(np.where(keep, np.take_along_axis(found.rows, order, 1), -1),
                     np.where(keep, np.take_along_axis(found.scores, order, 1), 0).astype(np.float32), keep)

    def vectors(self, name: str, found: Found) -> np.ndarray:
        """[B, k, D] float32: the `name` vector of each hit, zeros in masked slots (as `retrieve` fills them)."""
        import torch

        idx = torch.from_numpy(np.where(found.mask, found.rows, 0)).to(self.device)
        mask = torch.from_numpy(found.mask).to(self.device)
        with torch.no_grad():
            out = self._full[name][idx] * mask[..., None]
        return out.cpu().numpy()

    def hits(self, found: Found, fused: str | None = None) -> list[list[Hit]]:
        vecs = self.vectors(fused, found) if fused else None
        out = []
        for i in range(len(found.rows)):
            n = int(found.mask[i].sum())
            out.append([Hit(id=self.ids[r], score=float(found.scores[i, j]),
                            vector=vecs[i, j] if vecs is not None else None)
                        for j, r in enumerate(found.rows[i, :n])])
        return out

    def ids_of(self, found: Found) -> list[list[str]]:
        return [[self.ids[r] for r in found.rows[i, :int(found.mask[i].sum())]] for i in range(len(found.rows))]


# -- the process-wide cache ------------------------------------------------------------------------------------
@dataclass
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    index: DeviceIndex | None = None
    declined: bool = False  # use_device_search said no for this version: ask the store, without recounting
    checked_at: float = 0.0  # when the index's size was last compared with the store's


# A takedown deletes points from a sealed version in place, perhaps from another process: a loaded index whose size
# no longer matches the store's is read again, checked at most this often
RECHECK_S = 5.0


_lock = threading.Lock()
_slots: "weakref.WeakKeyDictionary[VectorStore, dict[str, _Slot]]" = weakref.WeakKeyDictionary()


def _family(collection: str) -> str:
    """The memory a version's collection belongs to (reco-NAME-vN -> reco-NAME)."""
    m = re.fullmatch(r"(.*)-v\d+", collection)
    return m.group(1) if m else collection


def _peek(store: VectorStore, collection: str) -> _Slot | None:
    with _lock:
        return _slots.get(store, {}).get(collection)


def index_for(store: VectorStore, collection: str, device: str | None, settings, dim: int,
              names: Sequence[str]) -> DeviceIndex | None:
    """The device index to search `collection` with (loaded with `names` on first use), or None: ask the store.
    Loading a version drops the cached index of any other version of the same memory (a swap)."""
    mode = settings.device_search
    if device is None or mode == "off" or (mode == "auto" and not str(device).startswith("cuda")):
        return None
    with _lock:
        mine = _slots.setdefault(store, {})
        slot = mine.get(collection)
        if slot is None:
            for other in [c for c in mine if c != collection and _family(c) == _family(collection)]:
                del mine[other]
            slot = mine[collection] = _Slot()
    with slot.lock:
        if slot.declined:
            return None
        now, points = time.monotonic(), None
        if slot.index is not None and now - slot.checked_at > RECHECK_S:
            slot.checked_at, points = now, store.count(collection)
            if points != slot.index.n:  # a takedown took points out
                slot.index = None
        if slot.index is None or slot.index.device != str(device):
            points = store.count(collection) if points is None else points
            if not use_device_search(settings, device, points, dim):
                slot.declined = True
                return None
            slot.index = DeviceIndex.load(store, collection, names, device)
            slot.checked_at = now
        index = slot.index
    index.ensure(store, names)
    return index


def drop(store: VectorStore | None = None, collection: str | None = None) -> None:
    """Let go of cached indexes: one collection of a store, every one of a store, or all (store None)."""
    with _lock:
        if store is None:
            _slots.clear()
        elif collection is None:
            _slots.pop(store, None)
        else:
            _slots.get(store, {}).pop(collection, None)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # give the memory back to other processes, not only to this one's allocator


def cached(store: VectorStore) -> dict[str, DeviceIndex]:
    """The loaded indexes of a store, by collection."""
    with _lock:
        return {c: s.index for c, s in _slots.get(store, {}).items() if s.index is not None}
