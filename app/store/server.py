"""Server backend: a Qdrant server or cluster through qdrant-client (HNSW, sharding, replication, aliases).

Tests run it against qdrant-client's local mode (`ServerStore(":memory:")`), which speaks the same API.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..errors import RecoError, TransientError
from ..settings import mask_url, scrub
from .base import MODALITIES, Hit, Storage, VectorStore, as_matrix, check_vector_name, key_chunks

DEFAULT_EF = 128


class ServerStore(VectorStore):
    kind = "server"

    def __init__(self, url: str, api_key: str | None = None, timeout: int = 30, hnsw_ef: int = DEFAULT_EF,
                 shard_number: int | None = None, replication_factor: int | None = None,
                 oversampling: float | None = None, search_threads: int = 1):
        from qdrant_client import QdrantClient

        self.url = url
        self.hnsw_ef = hnsw_ef
        self.oversampling = oversampling
        self.search_threads = search_threads
        self._applied: dict[str, dict] = {}
        self.shard_number = shard_number
        self.replication_factor = replication_factor
        if url == ":memory:" or url.startswith("path:"):
            self.client = QdrantClient(location=":memory:") if url == ":memory:" else QdrantClient(path=url[5:])
        else:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)

    def _call(self, fn, *args, **kwargs):
        """Connection problems become TransientError (the ingest task retries them with backoff)."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            return fn(*args, **kwargs)
        except ResponseHandlingException as exc:
            raise TransientError(f"Qdrant at {mask_url(self.url)} did not answer: {scrub(str(exc), self.url)}") from exc
        except UnexpectedResponse as exc:
            if exc.status_code in (502, 503, 504, 429):
                raise TransientError(f"Qdrant at {mask_url(self.url)} is busy: {scrub(str(exc), self.url)}") from exc
            raise RecoError(f"Qdrant at {mask_url(self.url)} refused the request: {scrub(str(exc), self.url)}") from exc

    def ping(self) -> None:
        try:
            self._call(self.client.get_collections)
        except TransientError as exc:
            raise RecoError(f"{exc}; check RECO_QDRANT_URL (and RECO_QDRANT_API_KEY) and that Qdrant is running") from exc

    def create(self, collection: str, dim: int, storage: Storage | None = None,
               vectors: Sequence[str] = MODALITIES) -> None:
        from qdrant_client import models

        if self.exists(collection):
            return
        storage = storage or Storage()
        quantized = _quantization(storage.at_create())
        try:
            self._call(
                self.client.create_collection,
                collection_name=collection,
                vectors_config={n: models.VectorParams(size=dim, distance=models.Distance.COSINE,
                                                       quantization_config=quantized, on_disk=storage.on_disk or None)
                                for n in vectors},
                hnsw_config=models.HnswConfigDiff(m=16, ef_construct=128),
                # no indexing while the version is written; seal() switches it on
                optimizers_config=models.OptimizersConfigDiff(indexing_threshold=0),
                shard_number=self.shard_number,
                replication_factor=self.replication_factor,
            )
        except RecoError:
            if not self.exists(collection):  # lost a race with a concurrent task: fine if it now exists
                raise

    def exists(self, collection: str) -> bool:
        return bool(self._call(self.client.collection_exists, collection))

    def put(self, collection, ids, vectors, payloads) -> None:
        from qdrant_client import models

        lists = {name: as_matrix(x).tolist() for name, x in vectors.items()}
        if any(len(x) != len(ids) for x in lists.values()) or len(payloads) != len(ids):
            raise ValueError("ids, vectors and payloads must have the same length")
        self._call(self.client.upsert, collection_name=collection,
                   points=models.Batch(ids=list(ids), vectors=lists, payloads=list(payloads)), wait=True)

    def count(self, collection: str) -> int:
        return self._call(self.client.count, collection, exact=True).count

    def search(self, collection, queries, using, k, with_vector=None, exclude=None, score_threshold=None,
               with_payload=True, hnsw_ef=None) -> list[list[Hit]]:
        from qdrant_client import models

        check_vector_name(using)
        check_vector_name(with_vector, allow_none=True)
        q = as_matrix(queries)
        if not len(q):
            return []
        ef, oversampling = self._search_plan(collection, k, hnsw_ef)
        params = models.SearchParams(hnsw_ef=ef)
        if oversampling is not None:
            params = models.SearchParams(hnsw_ef=ef, quantization=models.QuantizationSearchParams(
                rescore=True, oversampling=oversampling))
        return self._split(lambda rows, excluded: self._search(collection, rows, using, k, with_vector, excluded,
                                                               score_threshold, with_payload, params), q, exclude)

    def _search(self, collection, q, using, k, with_vector, exclude, score_threshold, with_payload, params):
        from qdrant_client import models

        requests = []
        for i in range(len(q)):
            flt = None
            if exclude is not None and exclude[i]:
                flt = models.Filter(must_not=[models.HasIdCondition(has_id=list(exclude[i]))])
            requests.append(
                models.QueryRequest(
                    query=q[i].tolist(), using=using, limit=k, filter=flt, params=params,
                    with_payload=with_payload, with_vector=[with_vector] if with_vector else False,
                    score_threshold=score_threshold,
                )
            )
        results = self._call(self.client.query_batch_points, collection, requests=requests)
        return [[_hit(p, with_vector) for p in r.points] for r in results]

    def retrieve(self, collection, ids, with_vector=None) -> list[Hit]:
        check_vector_name(with_vector, allow_none=True)
        recs = self._call(
            self.client.retrieve, collection, ids=list(ids), with_payload=True,
            with_vectors=[with_vector] if with_vector else False,
        )
        by_id = {str(r.id): r for r in recs}
        return [_hit(by_id[i], with_vector, score=1.0) for i in ids if i in by_id]

    def iter_ids(self, collection, batch=1024) -> Iterator[list[str]]:
        offset = None
        while True:
            recs, offset = self._call(
                self.client.scroll, collection, limit=batch, offset=offset, with_payload=False, with_vectors=False
            )
            if recs:
                yield [str(r.id) for r in recs]
            if offset is None:
                return

    def scan_vectors(self, collection, names, batch=1024):
        offset = None
        while True:
            recs, offset = self._call(
                self.client.scroll, collection, limit=batch, offset=offset, with_payload=True,
                with_vectors=list(names),
            )
            if recs:
                yield ([str(r.id) for r in recs],
                       {n: np.asarray([r.vector[n] for r in recs], dtype=np.float32) for n in names},
                       [dict(r.payload or {}) for r in recs])
            if offset is None:
                return

    def seal(self, collection: str, storage: Storage | None = None) -> int:
        from qdrant_client import models

        points = self.count(collection)
        applied = self.storage(collection)
        kind = (storage.at_seal(points, self.dim(collection)) if storage else applied["quantization"])
        self._call(
            self.client.update_collection,
            collection_name=collection,
            optimizers_config=models.OptimizersConfigDiff(indexing_threshold=10000),
            # `auto` resolved now that the size is known (a collection created without quantization gets it here)
            quantization_config=_quantization(kind) if kind != applied["quantization"] else None,
        )
        self._applied.pop(collection, None)
        if kind != applied["quantization"]:
            self._applied[collection] = {**applied, "quantization": kind}
        return points

    def dim(self, collection: str) -> int:
        return self._first_vector(self._call(self.client.get_collection, collection).config.params).size

    @staticmethod
    def _first_vector(params):
        """Every named vector of a collection is configured alike: the first stands for all."""
        return next(iter(params.vectors.values()))

    def storage(self, collection: str) -> dict:
        if collection not in self._applied:
            params = self._call(self.client.get_collection, collection).config.params
            image = self._first_vector(params)
            quantized = image.quantization_config or getattr(params, "quantization_config", None)
            kind = "none"
            if getattr(quantized, "scalar", None) is not None:
                kind = "int8"
            elif getattr(quantized, "binary", None) is not None:
                kind = "binary"
            self._applied[collection] = {"quantization": kind, "on_disk": bool(image.on_disk)}
        return self._applied[collection]

    def vector_names(self, collection: str) -> list[str]:
        return list(self._call(self.client.get_collection, collection).config.params.vectors)

    def count_keys(self, collection, keys, keep_version=None) -> int:
        return sum(self._call(self.client.count, collection, count_filter=f, exact=True).count
                   for f in _key_filters(keys, keep_version))

    def delete_keys(self, collection, keys, keep_version=None) -> int:
        from qdrant_client import models

        deleted = 0
        for f in _key_filters(keys, keep_version):
            n = self._call(self.client.count, collection, count_filter=f, exact=True).count
            if n:
                self._call(self.client.delete, collection, points_selector=models.FilterSelector(filter=f), wait=True)
                deleted += n
        return deleted

    def keys_of_version(self, collection, version) -> list[str]:
        from qdrant_client import models

        flt = models.Filter(must=[models.FieldCondition(key="version", match=models.MatchValue(value=int(version)))])
        keys, offset = [], None
        while True:
            recs, offset = self._call(self.client.scroll, collection, scroll_filter=flt, limit=4096, offset=offset,
                                      with_payload=["key"], with_vectors=False)
            keys += [str((r.payload or {}).get("key")) for r in recs]
            if offset is None:
                return keys

    def drop(self, collection: str) -> None:
        self._applied.pop(collection, None)
        self._call(self.client.delete_collection, collection)

    def point_alias(self, alias: str, collection: str) -> None:
        """One aliases request with delete + create: Qdrant applies it atomically."""
        from qdrant_client import models

        ops = []
        if any(a.alias_name == alias for a in self._call(self.client.get_aliases).aliases):
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias)))
        ops.append(
            models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=collection, alias_name=alias))
        )
        self._call(self.client.update_collection_aliases, change_aliases_operations=ops)

    def drop_alias(self, alias: str) -> None:
        from qdrant_client import models

        if any(a.alias_name == alias for a in self._call(self.client.get_aliases).aliases):
            self._call(
                self.client.update_collection_aliases,
                change_aliases_operations=[models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))],
            )

    def alias_target(self, alias: str) -> str | None:
        for a in self._call(self.client.get_aliases).aliases:
            if a.alias_name == alias:
                return a.collection_name
        return None

    def close(self) -> None:
        self.client.close()


def _hit(p, with_vector: str | None, score: float | None = None) -> Hit:
    vec = None
    if with_vector and isinstance(p.vector, dict) and p.vector.get(with_vector) is not None:
        vec = np.asarray(p.vector[with_vector], dtype=np.float32)
    return Hit(id=str(p.id), score=float(p.score if score is None else score), payload=dict(p.payload or {}), vector=vec)


def _key_filters(keys, keep_version: int | None):
    """Filters matching payload `key` among `keys`, leaving out points whose `version` is keep_version."""
    from qdrant_client import models

    keep = ([models.FieldCondition(key="version", match=models.MatchValue(value=int(keep_version)))]
            if keep_version is not None else None)
    for chunk in key_chunks(keys):
        yield models.Filter(must=[models.FieldCondition(key="key", match=models.MatchAny(any=chunk))], must_not=keep)


def _quantization(kind: str):
    """qdrant-client's config for a quantization kind; the quantized vectors always in RAM."""
    from qdrant_client import models

    if kind == "int8":
        return models.ScalarQuantization(scalar=models.ScalarQuantizationConfig(
            type=models.ScalarType.INT8, quantile=0.99, always_ram=True))
    if kind == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    return None
