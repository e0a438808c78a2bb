"""The store contract. Both backends pass tests/test_store_contract.py unchanged.

A collection holds one memory version: a point per image-text pair, named vectors `image` and `text` (cosine,
L2-normalised float32), payload `key`, `caption`, `shard`. Collections are written while building and
sealed (indexed, then read-only) when the version becomes ready.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np

MODALITIES = ("image", "text")
_POINT_NS = uuid.UUID("9b1c3f4e-4a1d-5c2b-8e7f-0a1b2c3d4e5f")


def collection_name(memory: str, version: int) -> str:
    return f"reco-{memory}-v{version}"


def point_id(memory: str, version: int, key: str) -> str:
    """Deterministic id: a task that runs twice overwrites its own points instead of adding copies."""
    return str(uuid.uuid5(_POINT_NS, f"{memory}\x00{version}\x00{key}"))


@dataclass
class Hit:
    id: str
    score: float
    payload: dict = field(default_factory=dict)
    vector: np.ndarray | None = None


def check_modality(name: str | None, allow_none: bool = False) -> None:
    if name is None and allow_none:
        return
    if name not in MODALITIES:
        raise ValueError(f"vector name must be one of {MODALITIES}, got {name!r}")


class VectorStore(ABC):
    """One memory version = one collection. Writes wait until the store has applied them."""

    kind: str = "abstract"

    @abstractmethod
    def ping(self) -> None:
        """Raise RecoError with a what-to-fix message when the store cannot be reached."""

    @abstractmethod
    def create(self, collection: str, dim: int) -> None:
        """Create the collection if it does not exist (idempotent; a rerun task calls it again)."""

    @abstractmethod
    def exists(self, collection: str) -> bool: ...

    @abstractmethod
    def upsert(
        self,
        collection: str,
        ids: Sequence[str],
        image: np.ndarray,
        text: np.ndarray,
        payloads: Sequence[dict],
    ) -> None: ...

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
    ) -> list[list[Hit]]:
        """Batched kNN: for each query row, the k nearest points by the `using` vector, best first.

        `with_vector` returns that named vector of each hit (it may be the other modality: fusion reads it);
        `exclude[i]` is a set of point ids query i must not return (a training pair's own item).
        """

    @abstractmethod
    def retrieve(self, collection: str, ids: Sequence[str], with_vector: str | None = None) -> list[Hit]:
        """Points by id, in the order given; missing ids are left out."""

    @abstractmethod
    def iter_ids(self, collection: str, batch: int = 1024) -> Iterator[list[str]]: ...

    @abstractmethod
    def scan(self, collection: str, batch: int = 1024) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, list[dict]]]:
        """Every point as batches of (ids, image vectors, text vectors, payloads): training reads its pairs so."""

    @abstractmethod
    def seal(self, collection: str) -> int:
        """Index and flush: the collection is complete and will not change. Returns its number of points."""

    @abstractmethod
    def drop(self, collection: str) -> None: ...

    def point_alias(self, alias: str, collection: str) -> None:
        """Atomically point `alias` at `collection` (a no-op where the metadata DB is the only pointer)."""

    def drop_alias(self, alias: str) -> None:
        """Remove `alias` if it exists."""

    @contextmanager
    def hold(self, collection: str, create_dim: int | None = None) -> Iterator[None]:
        """Keep a collection open across many calls (query loops, training, a shard's upserts); a no-op for
        servers. With create_dim, create the collection first when it does not exist (one open, not two)."""
        if create_dim is not None:
            self.create(collection, create_dim)
        yield

    def close(self) -> None:
        pass


def as_matrix(x: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got {x.shape[1]}")
    return x
