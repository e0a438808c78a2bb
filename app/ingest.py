"""Ingestion of one shard: read, decode, encode, upsert (the store confirms), mark done. The Celery task in
workers/tasks.py and the embedded profile's in-process runner both call `run_shard`.

Idempotent: point ids are UUIDv5(memory, version, key), so a shard that runs twice (a redelivered message, a
worker killed half-way) overwrites its own points and the memory ends with each item exactly once.
"""

from __future__ import annotations

import io
import queue
import threading
from collections import Counter
from typing import Callable, Iterable, Iterator

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from .corpus import Item, SkipReason, read_shard
from .db.models import IngestShard, Memory, MemoryVersion, ShardStatus, VersionStatus, utcnow
from .errors import RecoError, TransientError
from .store.base import point_id

BATCH_SIZE = 128


def _decode(item: Item):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(item.image_bytes))
        im.load()  # force the full decode: truncated files fail here, not later
        return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run a generator in a background thread (reading and decoding overlap with encoding)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for x in it:
                q.put(x)
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while True:
        x = q.get()
        if x is done:
            return
        if isinstance(x, BaseException):
            raise x
        yield x


def _overlap(backbone) -> bool:
    """Prepare the next batch in a background thread while this one is encoded?

    Yes when an accelerator encodes (the CPU is idle meanwhile) and when nothing is encoded (embeddings). Not when
    the CPU encodes: torch's intra-op threads already occupy every core, and a second busy Python thread (or a
    DataLoader worker process) only contends with them; measured on 2 cores with the tiny model, inline was
    1.2x faster than a thread under load and 1.07x faster than a thread or a worker process when idle
    (benchmarks/ingest.py).
    """
    return backbone is None or not str(backbone.device).startswith("cpu")


def _prepared(fmt: str, spec: dict, backbone, counts: Counter, batch_size: int) -> Iterator[tuple]:
    """Batches of (keys, captions, sources, pixels or image vectors, text vectors or None), skips counted."""
    seen: set[str] = set()
    for batch in _batches(read_shard(fmt, spec), batch_size):
        keys, caps, srcs, imgs, img_embs, txt_embs = [], [], [], [], [], []
        for it in batch:
            if it.skip:
                counts[it.skip] += 1
                continue
            if it.key in seen:
                counts[SkipReason.DUPLICATE_KEY] += 1
                continue
            if it.image_emb is None:
                im = _decode(it)
                if im is None:
                    counts[SkipReason.CORRUPT_IMAGE] += 1
                    continue
                imgs.append(im)
            else:
                img_embs.append(it.image_emb)
                txt_embs.append(it.text_emb)
            seen.add(it.key)
            keys.append(it.key)
            caps.append(it.caption)
            srcs.append(it.src)
        if not keys:
            continue
        if img_embs:
            yield keys, caps, srcs, np.stack(img_embs), np.stack(txt_embs)
        else:
            yield keys, caps, srcs, backbone.preprocess_images(imgs), None


def run_shard(rt, shard_id: int, progress: Callable[[int], None] | None = None, batch_size: int = BATCH_SIZE,
              finalize: bool = True) -> dict:
    """Ingest one shard. Returns its summary. Safe to call again for a shard that is done or half-done.

    finalize: seal the version when this was its last shard (a caller that runs every shard itself, holding
    the collection open meanwhile, passes False and finalizes once at the end)."""
    from .backbone import get_backbone

    with rt.db.session() as s:
        shard = s.get(IngestShard, shard_id)
        if shard is None:
            raise RecoError(f"ingest shard {shard_id} does not exist (was its version deleted?)")
        v = shard.version
        mem = s.get(Memory, v.memory_id)
        if shard.status == ShardStatus.DONE or v.status != VersionStatus.BUILDING:
            return {"shard": shard_id, "status": shard.status, "skipped_run": True}
        shard.status = ShardStatus.RUNNING
        shard.attempts = (shard.attempts or 0) + 1
        shard.started_at = utcnow()
        fmt, spec, collection, dim, backbone_spec = v.source_format, dict(shard.spec), v.collection, v.dim, v.backbone
        memory_name, version_number, version_id = mem.name, v.version, v.id
    try:
        backbone = None if fmt == "embeddings" else get_backbone(backbone_spec, rt.settings.device, rt.settings.offline)
        counts: Counter = Counter()
        chunks, stored, reported = [], 0, 0
        # encode the whole shard first, then write it under one open of the collection: an embedded shard is
        # locked only while writing, and a worker that dies while encoding has written nothing
        batches = _prepared(fmt, spec, backbone, counts, batch_size)
        if _overlap(backbone):
            batches = _prefetch(batches)
        for keys, caps, srcs, images, texts in batches:
            if texts is None:
                texts = backbone.encode_texts(caps)
                images = backbone.encode_image_tensor(images)
            if images.shape[1] != dim:
                raise RecoError(f"vectors have dimension {images.shape[1]}, the memory expects {dim}")
            ids = [point_id(memory_name, version_number, k) for k in keys]
            shard_name = spec.get("name", str(shard_id))
            payloads = [{"key": k, "caption": c, "shard": shard_name, **({"src": src} if src else {})}
                        for k, c, src in zip(keys, caps, srcs)]
            chunks.append((ids, images, texts, payloads))
            stored += len(ids)
            if progress:
                processed = stored + sum(counts.values())
                progress(processed - reported)
                reported = processed
        with rt.store.hold(collection, create_dim=dim):
            for chunk in chunks:
                rt.store.upsert(collection, *chunk)
    except (TransientError, OperationalError, ConnectionError):
        raise  # the task retries; the shard stays running until then
    except Exception as exc:
        _fail_shard(rt, shard_id, str(exc) if isinstance(exc, RecoError) else f"{type(exc).__name__}: {exc}")
        raise
    with rt.db.session() as s:
        shard = s.get(IngestShard, shard_id)
        shard.status = ShardStatus.DONE
        shard.items_stored = stored
        shard.items_skipped = sum(counts.values())
        shard.skip_reasons = dict(counts)
        shard.error = None
        shard.finished_at = utcnow()
    if finalize:
        finalize_if_complete(rt, version_id)
    return {"shard": shard_id, "status": ShardStatus.DONE, "stored": stored, "skipped": dict(counts)}


def _fail_shard(rt, shard_id: int, error: str) -> None:
    with rt.db.session() as s:
        shard = s.get(IngestShard, shard_id)
        if shard is None:
            return
        shard.status = ShardStatus.FAILED
        shard.error = error
        shard.finished_at = utcnow()
        v = shard.version
        if v.status == VersionStatus.BUILDING:
            v.status = VersionStatus.FAILED
            v.error = f"shard {shard.index} ({shard.spec.get('name', '')}): {error}"


def finalize_if_complete(rt, version_id: int) -> str | None:
    """When every shard is done: seal the collection (HNSW), reconcile counts, mark ready, maybe activate.

    Whoever finishes the last shard gets here; the status flip building→finalizing is one conditional UPDATE,
    so exactly one process finalizes even when several finish at once.
    """
    with rt.db.session() as s:
        statuses = s.scalars(select(IngestShard.status).where(IngestShard.version_id == version_id)).all()
        if not statuses or any(st != ShardStatus.DONE for st in statuses):
            return None
        claimed = s.execute(
            update(MemoryVersion)
            .where(MemoryVersion.id == version_id, MemoryVersion.status == VersionStatus.BUILDING)
            .values(status=VersionStatus.FINALIZING)
        ).rowcount
    if claimed != 1:
        return None
    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        shards = list(v.shards)
        expected = sum(sh.items_stored for sh in shards)
        skipped = sum(sh.items_skipped for sh in shards)
        collection, activate_after = v.collection, bool(v.activate_when_ready)
        name, number = v.memory.name, v.version
    error = None
    if expected == 0:
        error = "no item could be stored (see the skip reasons with `reco memory show`)"
    else:
        n = rt.store.seal(collection)
        if n != expected:
            error = f"the vector store holds {n} points but the shards stored {expected} (duplicate keys across shards?)"
    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        v.items_stored, v.items_skipped = expected, skipped
        if error:
            v.status, v.error = VersionStatus.FAILED, error
        else:
            v.status, v.ready_at = VersionStatus.READY, utcnow()
    if not error and activate_after:
        from .memory import activate

        activate(rt, name, number)
    return VersionStatus.FAILED if error else VersionStatus.READY
