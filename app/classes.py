"""Class sets: a zero-shot classifier's classes as a versioned store collection.

A dense zero-shot classifier keeps one row per class in RAM and scores every image against every row; at OVEN's
six million Wikipedia entities that matrix alone is 12 GB at 512-d. A class set stores the class embeddings
(the prompt templates' text embeddings, averaged per class and re-normalised as open_clip does) in their own
collection, so classification becomes a top-k search. With a trained model, each prompt is also refined by the
model's text side with its memory (RECO's text half) and stored beside the frozen one: one collection serves the
frozen baseline and RECO side by side.

A class set is a memory row of kind `classes` (app/memory.py): numbered versions, one active, atomic swap,
`verify`, and the same backbone checks as a memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .db.models import IngestShard, ShardStatus, utcnow
from .errors import RecoError
from .memory import CLASSES, create_version, fail_shard, finalize_if_complete, storage_of
from .metrics import zero_shot_weights
from .names import check_name
from .store.base import CLASS_VECTORS, Storage, point_id

# `auto` ranking reads the class matrix into RAM and multiplies up to this many classes, and searches the store
# above it. Measured on 512-d classes, 2,000 images a call, search at CLASS_SEARCH_EF
# (benchmarks/results/classes.json): at 10k a first call (the matrix read from the store included) ranks 3,027
# images/s dense against 1,881 searched; at 30k 965 against 1,481, and the matrix only falls behind from there
# (100k: 235 vs 605; 1M: see the results). The switch sits between the two measured points.
DENSE_MAX_CLASSES = 20_000
RANKINGS = ("auto", "dense", "search")
# an image searching text embeddings is a query from another distribution, where HNSW needs a wider search than
# within one modality (benchmarks/results/classes.json, 1M int8 classes at 512-d): images like the classes keep
# 0.993 of the exact top-1 at ef 512 and 0.969 at 128, random directions 0.24 and 0.11, for 0.66x the speed
CLASS_SEARCH_EF = 512
CLASSES_PER_BATCH = 1024  # classes encoded (x templates) and written per step


def read_names(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, names) from one class name per line (the name is its id), or JSONL with an id and a name per line:
    `{"id", "name"}`, or OVEN's entity list `{"wikidata_id", "wikipedia_title"}`. UTF-8, with or without a BOM
    (app/textfile.py); every name is checked before anything is encoded or stored."""
    from .datasets import check_class_name, read_jsonl
    from .textfile import lines

    p = Path(path)
    if not p.is_file():
        raise RecoError(f"class names file {path} not found (one name per line, or JSONL with id and name)")
    first_line = next((text.strip() for _, text in lines(p) if text.strip()), "")
    if first_line.startswith("{"):
        rows = ((n, *_entry(p, n, obj)) for n, obj in read_jsonl(p))
    else:
        rows = ((n, text.strip(), text.strip()) for n, text in lines(p) if text.strip())
    ids, names, first = [], [], {}
    for n, cid, name in rows:
        check_class_name(p, f"line {n}", name)
        if cid in first:
            raise RecoError(f"{p} line {n} repeats the class id {cid!r} of line {first[cid]}: every class once")
        first[cid] = n
        ids.append(cid)
        names.append(name)
    if not ids:
        raise RecoError(f"{p} holds no class names")
    return ids, names


def _entry(p: Path, n: int, row: dict) -> tuple[str, str]:
    cid = row.get("id", row.get("wikidata_id"))
    name = row.get("name", row.get("wikipedia_title"))
    if not isinstance(cid, (str, int)) or not isinstance(name, str) or not name.strip():
        raise RecoError(f"{p} line {n} needs an id and a name: {{\"id\": ..., \"name\": ...}} (or OVEN's "
                        f"wikidata_id and wikipedia_title)")
    return str(cid), name.strip()


def build_class_set(rt, name: str, names_file: str, *, backbone: str | None = None, model: str | None = None,
                    memory: str | None = None, templates: list[str] | None = None, activate: bool = False,
                    storage: Storage | None = None, progress: bool = False):
    """Encode every class's prompts, refine them with `model`'s text side when given, and store the class
    embeddings as the next version of class set NAME. Returns the version row."""
    from .backbone import BackboneSpec, get_backbone, hash_file
    from .datasets import templates_for

    check_name(name)
    ids, names = read_names(names_file)  # before torch: a wrong file fails in a second
    templates = templates or templates_for("default")
    if bool(backbone) == bool(model):
        raise RecoError("give --backbone (frozen class embeddings) or --model (frozen and RECO-refined ones)")
    enc = refine_from = None
    if model:
        from .encoder import RecoEncoder

        enc = RecoEncoder.load(model, memory=memory, runtime=rt)
        refine_from, mem_version = enc.resolve()  # refused when the memory holds another backbone
        spec_text, spec_hash, dim = enc.info["backbone"], enc.info["backbone_hash"], enc.info["dim"]
        encoder = enc.backbone
        refined = {"model": model, "checkpoint": enc.checkpoint, "k": enc.k, "memory": enc.memory,
                   "memory_version": mem_version.version}
    else:
        if memory:
            raise RecoError("--memory refines the classes with a model's text side: give --model too")
        spec = BackboneSpec.parse(backbone)
        spec_text, spec_hash, dim = spec.canonical, spec.fingerprint, spec.dim
        rt.store.ping()
        encoder = get_backbone(spec.canonical, rt.settings.device, rt.settings.offline)
        refined = None
    details = {"names_sha256": hash_file(names_file), "templates": templates, "refined": refined}
    return store_class_set(rt, name, _encoded(ids, names, templates, encoder, enc, refine_from), count=len(ids),
                           source=names_file, backbone=spec_text, backbone_hash=spec_hash, dim=dim,
                           vectors=CLASS_VECTORS if enc else CLASS_VECTORS[:1], details=details, activate=activate,
                           storage=storage, progress=progress)


def _encoded(ids, names, templates, encoder, enc, refine_from):
    """Batches of (ids, names, {vector: class embeddings}): the templates' embeddings averaged per class."""
    n_t = len(templates)
    for a in range(0, len(ids), CLASSES_PER_BATCH):
        chunk_ids, chunk_names = ids[a:a + CLASSES_PER_BATCH], names[a:a + CLASSES_PER_BATCH]
        t = encoder.encode_texts([tpl.format(c=c) for c in chunk_names for tpl in templates])
        out = {"frozen": zero_shot_weights(t, len(chunk_ids), n_t)}
        if enc is not None:
            out["refined"] = zero_shot_weights(enc.refine(t, "text", collection=refine_from), len(chunk_ids), n_t)
        yield chunk_ids, chunk_names, out


def store_class_set(rt, name: str, batches, *, count: int, source: str, backbone: str, backbone_hash: str | None,
                    dim: int, vectors=CLASS_VECTORS[:1], details: dict | None = None, activate: bool = False,
                    storage: Storage | None = None, progress: bool = False):
    """Store class embeddings that are already computed as the next version of NAME: `batches` yields
    (ids, names, {vector: [n, dim] unit vectors}). `build_class_set` encodes and calls this; so can whoever
    encoded the classes elsewhere (a GPU machine, a benchmark). Returns the version row, ready or failed."""
    check_name(name)
    rt.store.ping()
    v = create_version(rt, name, source=str(Path(source).resolve()) if Path(source).exists() else source,
                       fmt="names", backbone=backbone, backbone_hash=backbone_hash, dim=dim,
                       shard_specs=[{"name": Path(source).name, "rows": count}], activate=activate, storage=storage,
                       kind=CLASSES, details={"classes": count, **(details or {})})
    with rt.db.session() as s:
        shard_id = s.query(IngestShard.id).filter_by(version_id=v.id).scalar()
    try:
        stored = _write(rt, name, v, batches, count, tuple(vectors), progress)
    except BaseException as exc:
        fail_shard(rt, shard_id, str(exc) if isinstance(exc, RecoError) else f"{type(exc).__name__}: {exc}")
        raise
    with rt.db.session() as s:
        shard = s.get(IngestShard, shard_id)
        shard.status, shard.items_stored, shard.finished_at = ShardStatus.DONE, stored, utcnow()
    finalize_if_complete(rt, v.id)
    return v


def _write(rt, name, v, batches, count, vectors, progress) -> int:
    from tqdm import tqdm

    stored = 0
    with rt.store.hold(v.collection, create_dim=v.dim, storage=storage_of(v), vectors=vectors), \
            tqdm(total=count, unit="class", desc=f"classes {name} v{v.version}", disable=not progress,
                 dynamic_ncols=True) as bar:
        for chunk_ids, chunk_names, out in batches:
            if tuple(out) != vectors or any(x.shape != (len(chunk_ids), v.dim) for x in out.values()):
                raise RecoError(f"class embeddings must be {', '.join(vectors)} of shape (n, {v.dim}), got "
                                f"{ {k: x.shape for k, x in out.items()} }")
            rt.store.put(v.collection, [point_id(name, v.version, c) for c in chunk_ids], out,
                         [{"key": c, "name": nm} for c, nm in zip(chunk_ids, chunk_names)])
            stored += len(chunk_ids)
            bar.update(len(chunk_ids))
    return stored


@dataclass
class ClassIndex:
    """One ready version of a class set, opened for ranking images against its classes. It keeps the collection
    open until `close()` (an embedded 1M-class set takes seconds to open; an evaluation ranks several times)."""

    rt: object
    name: str
    version: int
    collection: str
    count: int
    backbone: str
    backbone_hash: str | None
    details: dict
    ef: int = CLASS_SEARCH_EF  # the graph search's width for `search` ranking
    _held: contextlib.ExitStack | None = field(default=None, repr=False)  # the collection, open until close()
    _dense: dict = field(default_factory=dict, repr=False)  # vector name -> (keys, matrix), read once

    @classmethod
    def open(cls, rt, ref: str) -> "ClassIndex":
        """NAME (its active version) or NAME@VERSION."""
        from .memory import check_complete, resolve_collection
        from .train import parse_memory_ref

        name, number = parse_memory_ref(ref)
        collection, v = resolve_collection(rt, name, number, kind=CLASSES)  # refuses a version not ready
        index = cls(rt, name, v.version, collection, v.items_stored or 0, v.backbone, v.backbone_hash,
                    dict(v.details or {}))
        index._held = contextlib.ExitStack()
        index._held.enter_context(rt.store.hold(index.collection))
        try:
            check_complete(rt, name, index.collection, v)
        except BaseException:
            index.close()
            raise
        return index

    def close(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()
        self._dense.clear()

    def __enter__(self) -> "ClassIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def refined(self) -> dict | None:
        return self.details.get("refined")

    def point(self, class_id: str) -> str:
        return point_id(self.name, self.version, class_id)

    def missing(self, class_ids: list[str]) -> list[str]:
        """The ids among `class_ids` the class set does not hold."""
        held = set()
        for a in range(0, len(class_ids), 4096):
            held |= set(self.names(class_ids[a:a + 4096]))
        return [c for c in class_ids if c not in held]

    def names(self, class_ids: list[str]) -> dict[str, str]:
        """{id: name} for these class ids (the gallery shows names)."""
        hits = self.rt.store.retrieve(self.collection, [self.point(c) for c in class_ids])
        return {h.payload.get("key"): h.payload.get("name") for h in hits}

    def ranking(self, choice: str) -> str:
        if choice not in RANKINGS:
            raise RecoError(f"--ranking must be one of {', '.join(RANKINGS)}")
        if choice == "auto":
            return "dense" if self.count <= DENSE_MAX_CLASSES else "search"
        return choice

    def top_k(self, queries: np.ndarray, vector: str, k: int, ranking: str) -> tuple[np.ndarray, np.ndarray]:
        """(class ids [n, k] as an object array, scores [n, k]), best first, by the `vector` class embeddings."""
        k = min(k, self.count)
        if ranking == "search":
            hits = self.rt.store.search(self.collection, queries, using=vector, k=k, hnsw_ef=self.ef)
            ids = np.array([[h.payload.get("key") for h in row] for row in hits], dtype=object)
            scores = np.array([[h.score for h in row] for row in hits], dtype=np.float32)
            return ids, scores
        keys, matrix = self._matrix(vector)
        return dense_top_k(queries, matrix, k, keys)

    def _matrix(self, vector: str) -> tuple[np.ndarray, np.ndarray]:
        """Every class embedding in RAM (dense ranking), read once per index and vector."""
        cache = self._dense
        if vector not in cache:
            keys, parts = [], []
            for _ids, vectors, payloads in self.rt.store.scan_vectors(self.collection, [vector], batch=4096):
                keys += [p.get("key") for p in payloads]
                parts.append(vectors[vector])
            cache[vector] = (np.array(keys, dtype=object), np.concatenate(parts))
        return cache[vector]


def dense_top_k(queries: np.ndarray, matrix: np.ndarray, k: int, keys: np.ndarray | None = None,
                rows_per_step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of queries @ matrix.T, in slices of queries so the scores in flight stay near 256 MB (64M
    floats) whatever the number of classes."""
    import torch

    rows_per_step = rows_per_step or max(1, min(256, (64 << 20) // max(1, len(matrix))))
    m = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
    out_i, out_s = [], []
    for a in range(0, len(queries), rows_per_step):
        q = torch.from_numpy(np.ascontiguousarray(queries[a:a + rows_per_step], dtype=np.float32))
        s, i = torch.topk(q @ m.T, k, dim=1)
        out_i.append(i.numpy())
        out_s.append(s.numpy())
    idx = np.concatenate(out_i) if out_i else np.zeros((0, k), dtype=np.int64)
    scores = np.concatenate(out_s) if out_s else np.zeros((0, k), dtype=np.float32)
    return (keys[idx] if keys is not None else idx), scores
