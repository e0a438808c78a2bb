"""Embedded backend: Qdrant's engine in-process (qdrant-edge-py), one shard directory per memory version.

The engine allows one open shard per directory (it locks the WAL), so a shard is opened only for the work at
hand, under a file lock beside it: an ingest worker and the CLI on one machine take turns instead of colliding.
Within one process, concurrent users (threads, a `hold()` block) share a single open handle.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from filelock import FileLock

from ..errors import RecoError
from . import base
from .base import MODALITIES, Hit, Storage, VectorStore, as_matrix, check_vector_name, needs_graph

HNSW_M = 16
HNSW_EF_CONSTRUCT = 128
DEFAULT_EF = 128
WAL_MB = 32  # the engine's write-ahead log segment, allocated whole when a shard is created or loaded


def _edge():
    import qdrant_edge

    return qdrant_edge


@contextmanager
def _disk_full_as_error(path: Path, need_mb: float = 2 * WAL_MB) -> Iterator[None]:
    """The engine reports a full disk as a plain Exception ("Can't init WAL ... FileTooLarge", "No space left on
    device"): turn it into one line naming the disk and the space to free, not a raw engine message."""
    try:
        yield
    except RecoError:
        raise
    except Exception as exc:
        from ..errors import disk_full_error, is_disk_full

        if is_disk_full(exc):
            raise disk_full_error(path, need_mb) from exc
        raise


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.is_dir() else 0.0


class _Handle:
    def __init__(self, shard, lock: FileLock):
        self.shard = shard
        self.lock = lock
        self.users = 0


class EdgeStore(VectorStore):
    kind = "embedded"
    _handles: dict[str, _Handle] = {}  # process-wide: the engine allows one open shard per directory
    _registry_lock = threading.RLock()

    def __init__(self, root: Path | str, hnsw_ef: int = DEFAULT_EF, lock_timeout: float = 600.0,
                 oversampling: float | None = None, search_threads: int = 1):
        self.root = Path(root)
        self.hnsw_ef = hnsw_ef
        self.lock_timeout = lock_timeout
        self.oversampling = oversampling
        self.search_threads = search_threads
        self._applied: dict[str, dict] = {}  # collection -> storage read from its config (changes only at seal)

    # -- shard lifecycle -------------------------------------------------------------------------------
    def _dir(self, collection: str) -> Path:
        return self.root / collection

    def _config(self, dim: int, indexing: bool = False, graph: bool = True, quantization: str = "none",
                on_disk: bool = False, vectors: Sequence[str] = MODALITIES):
        e = _edge()
        quantized = None
        if quantization == "int8":  # the quantized vectors stay in RAM (Pinned) whatever the originals do
            quantized = e.ScalarQuantizationConfig(type=e.ScalarType.Int8, quantile=0.99, memory=e.Memory.Pinned)
        elif quantization == "binary":
            quantized = e.BinaryQuantizationConfig(memory=e.Memory.Pinned)
        return e.EdgeConfig(
            vectors={name: e.EdgeVectorParams(size=dim, distance=e.Distance.Cosine, quantization_config=quantized,
                                              memory=e.Memory.Cold if on_disk else None)
                     for name in vectors},
            # Qdrant's default: a segment under 10 MB per vector is searched exactly (faster there, and exact
            # answers make small memories' results reproducible; an HNSW graph built by several threads is not).
            # Such a segment never consults its graph, so sealing it builds none (m=0).
            hnsw_config=e.HnswIndexConfig(m=HNSW_M if graph else 0, ef_construct=HNSW_EF_CONSTRUCT,
                                          full_scan_threshold=base.FULL_SCAN_THRESHOLD_KB),
            # 0 disables indexing while a version is written; sealing switches it on and builds HNSW once
            optimizers=e.EdgeOptimizersConfig(indexing_threshold=1 if indexing else 0),
        )

    @contextmanager
    def _open(self, collection: str, create_dim: int | None = None, storage: Storage | None = None,
              vectors: Sequence[str] = MODALITIES) -> Iterator:
        path = self._dir(collection)
        key = str(path)
        with self._registry_lock:
            h = self._handles.get(key)
            if h is None:
                self.root.mkdir(parents=True, exist_ok=True)
                lock = FileLock(str(path) + ".lock", timeout=self.lock_timeout, thread_local=False)
                lock.acquire()
                try:
                    with _disk_full_as_error(path):
                        shard = self._load_or_create(path, collection, create_dim, storage, vectors)
                except BaseException:
                    lock.release()
                    raise
                h = self._handles[key] = _Handle(shard, lock)
            h.users += 1
        try:
            yield h.shard
        finally:
            with self._registry_lock:
                h.users -= 1
                if h.users == 0:
                    try:
                        with _disk_full_as_error(path):
                            h.shard.flush()
                            h.shard.close()
                    finally:
                        del self._handles[key]
                        h.lock.release()

    def _load_or_create(self, path: Path, collection: str, create_dim: int | None, storage: Storage | None,
                        vectors: Sequence[str]):
        e = _edge()
        if path.exists() and any(path.iterdir()):
            return e.EdgeShard.load(str(path))
        if create_dim is None:
            raise RecoError(f"vector collection {collection} does not exist under {self.root}")
        storage = storage or Storage()
        return e.EdgeShard.create(str(path), self._config(
            create_dim, quantization=storage.at_create(), on_disk=storage.on_disk, vectors=vectors))

    @contextmanager
    def hold(self, collection: str, create_dim: int | None = None, storage: Storage | None = None,
             vectors: Sequence[str] = MODALITIES) -> Iterator[None]:
        with self._open(collection, create_dim=create_dim, storage=storage, vectors=vectors):
            yield

    # -- contract --------------------------------------------------------------------------------------
    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RecoError(f"cannot create the embedded vector directory {self.root}: {exc}; check RECO_HOME") from exc

    def create(self, collection: str, dim: int, storage: Storage | None = None,
               vectors: Sequence[str] = MODALITIES) -> None:
        with self._open(collection, create_dim=dim, storage=storage, vectors=vectors):
            pass

    def _vector_configs(self, collection: str) -> dict:
        """The collection's named vectors' configs, as the engine wrote them (every one is configured alike)."""
        path = self._dir(collection) / "edge_config.json"
        try:
            vectors = json.loads(path.read_text())["vectors"]
            next(iter(vectors.values()))["size"]
        except (OSError, ValueError, KeyError, StopIteration) as exc:
            raise RecoError(f"vector collection {collection} has no readable config under {self.root}") from exc
        return vectors

    def storage(self, collection: str) -> dict:
        if collection not in self._applied:
            first = next(iter(self._vector_configs(collection).values()))
            quantized = first.get("quantization_config") or {}
            self._applied[collection] = {
                "quantization": "int8" if "scalar" in quantized else "binary" if "binary" in quantized else "none",
                "on_disk": first.get("memory") == "cold" or bool(first.get("on_disk"))}
        return self._applied[collection]

    def _params(self, collection: str, k: int, hnsw_ef: int | None = None):
        e = _edge()
        ef, oversampling = self._search_plan(collection, k, hnsw_ef)
        if oversampling is None:
            return e.SearchParams(hnsw_ef=ef)
        return e.SearchParams(hnsw_ef=ef, quantization=e.QuantizationSearchParams(rescore=True,
                                                                                 oversampling=oversampling))

    def exists(self, collection: str) -> bool:
        path = self._dir(collection)
        return path.exists() and any(path.iterdir())

    def put(self, collection, ids, vectors, payloads) -> None:
        e = _edge()
        lists = {name: as_matrix(x).tolist() for name, x in vectors.items()}
        if any(len(x) != len(ids) for x in lists.values()) or len(payloads) != len(ids):
            raise ValueError("ids, vectors and payloads must have the same length")
        points = [e.Point(id=pid, vector={name: x[i] for name, x in lists.items()}, payload=payloads[i])
                  for i, pid in enumerate(ids)]
        need = WAL_MB + 2 * sum(len(x) * len(x[0]) * 4 for x in lists.values() if x) / 2**20  # WAL + segment
        with self._open(collection) as shard, _disk_full_as_error(self._dir(collection), need):
            shard.update(e.UpdateOperation.upsert_points(points))  # applied on return; WAL-durable, flushed on close

    def count(self, collection: str) -> int:
        e = _edge()
        with self._open(collection) as shard:
            return shard.count(e.CountRequest(exact=True))

    def search(self, collection, queries, using, k, with_vector=None, exclude=None, score_threshold=None,
               with_payload=True, hnsw_ef=None) -> list[list[Hit]]:
        check_vector_name(using)
        check_vector_name(with_vector, allow_none=True)
        q = as_matrix(queries)
        if not len(q):
            return []
        with self._open(collection):  # one open for every slice
            params = self._params(collection, k, hnsw_ef)

            def search_one(rows, excluded):
                return self._search(collection, rows, using, k, with_vector, excluded, score_threshold,
                                    with_payload, params)

            return self._split(search_one, q, exclude)

    def _search(self, collection, q, using, k, with_vector, exclude, score_threshold, with_payload, params):
        e = _edge()
        requests = []
        for i in range(len(q)):
            flt = None
            if exclude is not None and exclude[i]:
                flt = e.Filter(must_not=[e.HasIdCondition({uuid.UUID(x) for x in exclude[i]})])
            requests.append(
                e.QueryRequest(
                    limit=k,
                    query=e.Query.Nearest(q[i].tolist(), using=using),
                    filter=flt,
                    with_payload=with_payload,
                    with_vector=[with_vector] if with_vector else False,
                    score_threshold=score_threshold,
                    params=params,
                )
            )
        with self._open(collection) as shard:
            results = shard.query_batch(e.QueryBatchRequest(requests))
        return [[_hit(p, with_vector) for p in row] for row in results]

    def retrieve(self, collection, ids, with_vector=None) -> list[Hit]:
        check_vector_name(with_vector, allow_none=True)
        with self._open(collection) as shard:
            recs = shard.retrieve(list(ids), with_payload=True, with_vector=[with_vector] if with_vector else False)
        by_id = {str(r.id): r for r in recs}
        return [_hit(by_id[i], with_vector, score=1.0) for i in ids if i in by_id]

    def iter_ids(self, collection, batch=1024) -> Iterator[list[str]]:
        e = _edge()
        offset = None
        with self._open(collection) as shard:
            while True:
                recs, offset = shard.scroll(
                    e.ScrollRequest(offset=offset, limit=batch, with_payload=False, with_vector=False)
                )
                if recs:
                    yield [str(r.id) for r in recs]
                if offset is None:
                    return

    def scan_vectors(self, collection, names, batch=1024):
        e = _edge()
        offset = None
        with self._open(collection) as shard:
            while True:
                recs, offset = shard.scroll(
                    e.ScrollRequest(offset=offset, limit=batch, with_payload=True, with_vector=list(names))
                )
                if recs:
                    yield _unpack(recs, names)
                if offset is None:
                    return

    def seal(self, collection: str, storage: Storage | None = None) -> int:
        e = _edge()
        path = self._dir(collection)
        with self._registry_lock:
            if str(path) in self._handles:
                raise RecoError(f"cannot seal {collection} while it is open in this process")
            with FileLock(str(path) + ".lock", timeout=self.lock_timeout, thread_local=False), \
                    _disk_full_as_error(path, _size_mb(path) + WAL_MB):  # optimize() writes a merged copy
                configs = self._vector_configs(collection)
                dim = next(iter(configs.values()))["size"]
                shard = e.EdgeShard.load(str(path))
                try:
                    points = shard.count(e.CountRequest(exact=True))
                finally:
                    shard.close()
                graph = needs_graph(points, dim)
                storage = storage or Storage(**self.storage(collection))  # as created
                # reloading with indexing switched on persists the new config; optimize() merges the segments
                # into one indexed segment, with an HNSW graph where search will consult one, and quantizes
                shard = e.EdgeShard.load(str(path), self._config(dim, indexing=True, graph=graph,
                                                                 quantization=storage.at_seal(points, dim),
                                                                 on_disk=storage.on_disk, vectors=list(configs)))
                try:
                    shard.optimize()
                    shard.flush()
                finally:
                    shard.close()
                    self._applied.pop(collection, None)  # the reload changed what the collection applies
        return points

    def dim(self, collection: str) -> int:
        return next(iter(self._vector_configs(collection).values()))["size"]

    def vector_names(self, collection: str) -> list[str]:
        return list(self._vector_configs(collection))

    def count_keys(self, collection, keys, keep_version=None) -> int:
        e = _edge()
        with self._open(collection) as shard:
            return sum(shard.count(e.CountRequest(exact=True, filter=f)) for f in _key_filters(keys, keep_version))

    def delete_keys(self, collection, keys, keep_version=None) -> int:
        e = _edge()
        deleted = 0
        with self._open(collection) as shard, _disk_full_as_error(self._dir(collection)):
            for f in _key_filters(keys, keep_version):
                n = shard.count(e.CountRequest(exact=True, filter=f))
                if n:
                    shard.update(e.UpdateOperation.delete_points_by_filter(f))
                    deleted += n
        return deleted

    def keys_of_version(self, collection, version) -> list[str]:
        e = _edge()
        flt = e.Filter(must=[e.FieldCondition(key="version", match=e.MatchValue(int(version)))])
        keys, offset = [], None
        with self._open(collection) as shard:
            while True:
                recs, offset = shard.scroll(e.ScrollRequest(offset=offset, limit=4096, filter=flt, with_payload=True,
                                                            with_vector=False))
                keys += [str((r.payload or {}).get("key")) for r in recs]
                if offset is None:
                    return keys

    def copy(self, source, target, exclude_keys=(), batch=2048) -> int:
        """The sealed files themselves, HNSW graph and quantized vectors included, copied under the source's lock
        into a scratch directory renamed into place (a crash leaves no half copy): nothing is re-indexed, and the
        seal of a delta only indexes what the delta adds. A target that exists already takes the generic path."""
        if self.exists(target):
            return super().copy(source, target, exclude_keys, batch)
        src, dst = self._dir(source), self._dir(target)
        scratch = dst.with_name(dst.name + ".copying")
        shutil.rmtree(scratch, ignore_errors=True)
        with self._open(source) as shard:
            with _disk_full_as_error(dst, _size_mb(src) + WAL_MB):
                shard.flush()
                shutil.copytree(src, scratch)
            with self._registry_lock:
                with FileLock(str(dst) + ".lock", timeout=self.lock_timeout, thread_local=False):
                    if dst.exists():
                        shutil.rmtree(dst)  # an empty directory a failed create left
                    scratch.rename(dst)
            self._applied.pop(target, None)
            if exclude_keys:
                self.delete_keys(target, list(exclude_keys))
            return self.count(source) - self.count_keys(source, list(exclude_keys))

    def drop(self, collection: str) -> None:
        self._applied.pop(collection, None)
        path = self._dir(collection)
        with self._registry_lock:
            if str(path) in self._handles:
                raise RecoError(f"cannot delete {collection} while it is open in this process")
            with FileLock(str(path) + ".lock", timeout=self.lock_timeout, thread_local=False):
                shutil.rmtree(path, ignore_errors=True)
        Path(str(path) + ".lock").unlink(missing_ok=True)


def _key_filters(keys, keep_version: int | None):
    """Filters matching payload `key` among `keys`, leaving out points whose `version` is keep_version."""
    e = _edge()
    keep = None
    if keep_version is not None:
        keep = [e.FieldCondition(key="version", match=e.MatchValue(int(keep_version)))]
    for chunk in base.key_chunks(keys):
        yield e.Filter(must=[e.FieldCondition(key="key", match=e.MatchAny(chunk))], must_not=keep)


def _unpack(recs, names) -> tuple[list[str], dict[str, np.ndarray], list[dict]]:
    ids = [str(r.id) for r in recs]
    vectors = {name: np.asarray([r.vector[name] for r in recs], dtype=np.float32) for name in names}
    return ids, vectors, [dict(r.payload or {}) for r in recs]


def _hit(p, with_vector: str | None, score: float | None = None) -> Hit:
    vec = None
    if with_vector:
        v = p.vector or {}
        vec = np.asarray(v.get(with_vector), dtype=np.float32) if v.get(with_vector) is not None else None
    return Hit(id=str(p.id), score=float(p.score if score is None else score), payload=dict(p.payload or {}), vector=vec)
