"""The store contract. Both backends pass tests/test_store_contract.py unchanged.

A collection holds one memory version: a point per image-text pair, named vectors `image` and `text` (cosine,
L2-normalised float32), payload `key`, `caption`, `shard`, and `version`: the version that encoded the point (a
delta version also holds points copied from its parent, which keep theirs). A class set version is a collection
too: a point per class, named vectors `frozen` (and `refined` when a model refined it), payload `key` (the class
id) and `name`.
Collections are written while building and sealed (indexed, then read-only) when the version becomes ready. The
one write a sealed collection takes is a takedown: `delete_keys`.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

MODALITIES = ("image", "text")  # a memory's vectors
CLASS_VECTORS = ("frozen", "refined")  # a class set's: the class prompts' embeddings, as encoded / RECO-refined
VECTOR_NAMES = MODALITIES + CLASS_VECTORS
QUANTIZATIONS = ("auto", "none", "int8", "binary")
# candidates per result rescored with the original vectors: int8 at 2 keeps the originals' recall@10 on CLIP-like
# 512-d data (0.9999 at 100k); 1-bit binary at 8 reaches 0.93 there (benchmarks/results/memory_scale.json)
OVERSAMPLING = {"int8": 2.0, "binary": 8.0}
# Qdrant's default: a segment under this many KB per vector is searched exactly, so it gets no graph and gains
# nothing from quantization
FULL_SCAN_THRESHOLD_KB = 10_000
SPLIT_AT = 256  # query batches at least this long are split across the store's search threads
_POINT_NS = uuid.UUID("9b1c3f4e-4a1d-5c2b-8e7f-0a1b2c3d4e5f")


def collection_name(memory: str, version: int) -> str:
    return f"reco-{memory}-v{version}"


def point_id(memory: str, version: int, key: str) -> str:
    """Deterministic id: a task that runs twice overwrites its own points instead of adding copies."""
    return str(uuid.uuid5(_POINT_NS, f"{memory}\x00{version}\x00{key}"))


@dataclass(frozen=True)
class Storage:
    """How a version keeps its vectors: `quantization` (int8 or binary, searched with rescoring from the original
    vectors) and `on_disk` (the originals memory-mapped; only the quantized vectors and the graph in RAM).
    `auto` quantizes int8 once the version is large enough to get an HNSW graph, and not below, where search is
    exact anyway."""

    quantization: str = "auto"
    on_disk: bool = False

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            from ..errors import RecoError

            raise RecoError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, not {self.quantization!r}")

    def at_create(self) -> str:
        return "none" if self.quantization == "auto" else self.quantization

    def at_seal(self, points: int, dim: int) -> str:
        if self.quantization != "auto":
            return self.quantization
        return "int8" if needs_graph(points, dim) else "none"


def needs_graph(points: int, dim: int) -> bool:
    return points * dim * 4 / 1024 >= FULL_SCAN_THRESHOLD_KB


@dataclass
class Hit:
    id: str
    score: float
    payload: dict = field(default_factory=dict)
    vector: np.ndarray | None = None


def check_vector_name(name: str | None, allow_none: bool = False) -> None:
    if name is None and allow_none:
        return
    if name not in VECTOR_NAMES:
        raise ValueError(f"vector name must be one of {VECTOR_NAMES}, got {name!r}")


class VectorStore(ABC):
    """One memory version = one collection. Writes wait until the store has applied them."""

    kind: str = "abstract"

    @abstractmethod
    def ping(self) -> None:
        """Raise RecoError with a what-to-fix message when the store cannot be reached."""

    @abstractmethod
    def create(self, collection: str, dim: int, storage: Storage | None = None,
               vectors: Sequence[str] = MODALITIES) -> None:
        """Create the collection with these named vectors if it does not exist (idempotent; a rerun task calls it
        again)."""

    @abstractmethod
    def exists(self, collection: str) -> bool: ...

    @abstractmethod
    def put(self, collection: str, ids: Sequence[str], vectors: dict[str, np.ndarray], payloads: Sequence[dict]) -> None:
        """Insert or overwrite points: `vectors` maps each of the collection's vector names to a matrix."""

    def upsert(self, collection: str, ids: Sequence[str], image: np.ndarray, text: np.ndarray,
               payloads: Sequence[dict]) -> None:
        """A memory's image-text pairs."""
        self.put(collection, ids, {"image": image, "text": text}, payloads)

    @abstractmethod
    def count(self, collection: str) -> int: ...

    @abstractmethod
    def search(
        self,
        collection: str,
        queries: np.ndarray,
        using: str,
        k: int,
        with_vector: str | None = None,
        exclude: Sequence[Iterable[str]] | None = None,
        score_threshold: float | None = None,
        with_payload: bool = True,
        hnsw_ef: int | None = None,
    ) -> list[list[Hit]]:
        """Batched kNN: for each query row, the k nearest points by the `using` vector, best first.

        `with_vector` returns that named vector of each hit (it may be the other modality: fusion reads it);
        `exclude[i]` is a set of point ids query i must not return (a training pair's own item); `hnsw_ef`
        widens (or narrows) the graph search for this call.
        """

    @abstractmethod
    def retrieve(self, collection: str, ids: Sequence[str], with_vector: str | None = None) -> list[Hit]:
        """Points by id, in the order given; missing ids are left out."""

    @abstractmethod
    def iter_ids(self, collection: str, batch: int = 1024) -> Iterator[list[str]]: ...

    @abstractmethod
    def scan_vectors(self, collection: str, names: Sequence[str], batch: int = 1024
                     ) -> Iterator[tuple[list[str], dict[str, np.ndarray], list[dict]]]:
        """Every point as batches of (ids, {name: vectors}, payloads)."""

    def scan(self, collection: str, batch: int = 1024) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[dict]]]:
        """A memory's every point as batches of (ids, image vectors, text vectors, payloads): training reads its
        pairs so."""
        for ids, vectors, payloads in self.scan_vectors(collection, MODALITIES, batch):
            yield ids, vectors["image"], vectors["text"], payloads

    @abstractmethod
    def seal(self, collection: str, storage: Storage | None = None) -> int:
        """Index and flush: the collection is complete and will not change. Returns its number of points.
        `storage` resolves `auto` quantization now that the size is known."""

    @abstractmethod
    def storage(self, collection: str) -> dict:
        """What the collection applies: {"quantization": none|int8|binary, "on_disk": bool}."""

    @abstractmethod
    def drop(self, collection: str) -> None: ...

    @abstractmethod
    def count_keys(self, collection: str, keys: Sequence[str], keep_version: int | None = None) -> int:
        """How many points have a payload `key` among `keys` (those whose payload `version` is `keep_version`
        left out)."""

    @abstractmethod
    def delete_keys(self, collection: str, keys: Sequence[str], keep_version: int | None = None) -> int:
        """Delete the points whose payload `key` is among `keys`, except those whose payload `version` is
        `keep_version` (a delta's own points, which replace their parent's copies). Works on sealed collections
        (a takedown). Idempotent; returns how many points it deleted."""

    @abstractmethod
    def keys_of_version(self, collection: str, version: int) -> list[str]:
        """The payload `key` of every point whose payload `version` is `version` (what a delta encoded)."""

    def copy(self, source: str, target: str, exclude_keys: Sequence[str] = (), batch: int = 2048) -> int:
        """Make `target` hold `source`'s points (same ids, vectors, payloads, storage) minus those whose key is in
        `exclude_keys`, without encoding anything; returns how many of the source's points it copied. `target` may
        already exist (a rerun after a crash, other points written meanwhile): points are written by id, so a
        second copy stores each once. A backend may copy faster than this generic scan-and-write (the embedded
        engine copies the sealed files, graph included)."""
        names = self.vector_names(source)
        self.create(target, self.dim(source), Storage(**self.storage(source)), names)
        skip = set(exclude_keys)
        with self.hold(source), self.hold(target):
            for ids, vectors, payloads in self.scan_vectors(source, names, batch):
                keep = [i for i, p in enumerate(payloads) if p.get("key") not in skip]
                if keep:
                    self.put(target, [ids[i] for i in keep], {n: x[keep] for n, x in vectors.items()},
                             [payloads[i] for i in keep])
            self.delete_keys(target, list(skip))
            return self.count(source) - self.count_keys(source, list(skip))

    @abstractmethod
    def dim(self, collection: str) -> int: ...

    @abstractmethod
    def vector_names(self, collection: str) -> list[str]: ...

    def point_alias(self, alias: str, collection: str) -> None:
        """Atomically point `alias` at `collection` (a no-op where the metadata DB is the only pointer)."""

    def drop_alias(self, alias: str) -> None:
        """Remove `alias` if it exists."""

    @contextmanager
    def hold(self, collection: str, create_dim: int | None = None, storage: Storage | None = None,
             vectors: Sequence[str] = MODALITIES) -> Iterator[None]:
        """Keep a collection open across many calls (query loops, training, a shard's upserts); a no-op for
        servers. With create_dim, create the collection first when it does not exist (one open, not two)."""
        if create_dim is not None:
            self.create(collection, create_dim, storage, vectors)
        yield

    def close(self) -> None:
        pass

    # -- how a search runs -----------------------------------------------------------------------------------------
    hnsw_ef: int  # set by each backend
    oversampling: float | None = None
    search_threads: int = 1

    def _search_plan(self, collection: str, k: int, hnsw_ef: int | None = None) -> tuple[int, float | None]:
        """(hnsw_ef, oversampling) for k results: a quantized collection rescores k x oversampling candidates
        with the original vectors, so its graph search must find that many (oversampling None: not quantized).
        `hnsw_ef` overrides the store's for one call (queries of another modality need a wider search)."""
        ef = hnsw_ef or self.hnsw_ef
        kind = self.storage(collection)["quantization"]
        if kind == "none":
            return max(ef, k), None
        oversampling = self.oversampling or OVERSAMPLING[kind]
        return max(ef, int(k * oversampling)), oversampling

    def _split(self, search_one, q: np.ndarray, exclude):
        """Run `search_one(rows, exclude_rows)` on slices of a long query batch in parallel threads: no lock of
        ours is held across a search, so slices overlap wherever the engine lets go of the GIL (a Qdrant
        server: always, it is a network call)."""
        n = len(q)
        if self.search_threads <= 1 or n < SPLIT_AT:
            return search_one(q, exclude)
        from concurrent.futures import ThreadPoolExecutor

        parts = min(self.search_threads, -(-n // (SPLIT_AT // 2)))
        bounds = np.linspace(0, n, parts + 1).astype(int)
        with ThreadPoolExecutor(parts, thread_name_prefix="reco-search") as pool:
            futures = [pool.submit(search_one, q[a:b], exclude[a:b] if exclude is not None else None)
                       for a, b in zip(bounds[:-1], bounds[1:])]
            return [row for f in futures for row in f.result()]


KEYS_PER_FILTER = 20_000  # a long takedown list becomes several modest filters


def key_chunks(keys: Iterable[str]) -> Iterator[list[str]]:
    """`keys` deduplicated and sorted, in chunks of KEYS_PER_FILTER: the `key` filters of count_keys/delete_keys."""
    keys = sorted({str(k) for k in keys})
    for a in range(0, len(keys), KEYS_PER_FILTER):
        yield keys[a:a + KEYS_PER_FILTER]


def as_matrix(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got {x.shape[1]}")
    return x
