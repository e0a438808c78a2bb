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
from sqlalchemy.exc import OperationalError

from .corpus import Item, SkipReason, read_shard
from .db.models import IngestShard, Memory, ShardStatus, utcnow
from .errors import RecoError, TransientError
from .leases import Heartbeat, claim, holder_name, release
from .memory import fail_shard, finalize_if_complete, storage_of
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
              finalize: bool = True, holder: str | None = None) -> dict:
    """Ingest one shard. Returns its summary. Safe to call again for a shard that is done or half-done.

    The shard is taken under a lease (app/leases.py) that a thread renews while it works: a shard another worker
    holds under a live lease is left to it. finalize: seal the version when this was its last shard (a caller
    that runs every shard itself, holding the collection open meanwhile, passes False and finalizes once at the
    end). holder: who takes the lease (default this host and process)."""
    holder = holder or holder_name()
    with rt.db.session() as s:
        shard = s.get(IngestShard, shard_id)
        if shard is None:
            raise RecoError(f"ingest shard {shard_id} does not exist (was its version deleted?)")
        v = shard.version
        mem = s.get(Memory, v.memory_id)
        job = {"fmt": v.source_format, "spec": dict(shard.spec), "collection": v.collection, "dim": v.dim,
               "backbone": v.backbone, "memory": mem.name, "version": v.version, "index": shard.index,
               "storage": storage_of(v)}
        version_id = v.id
    if not claim(rt, shard_id, holder):  # done, failed, no longer building, or held by a live worker
        with rt.db.session() as s:
            shard = s.get(IngestShard, shard_id)
            return {"shard": shard_id, "status": shard.status, "held_by": shard.worker, "skipped_run": True}
    with Heartbeat(rt, shard_id, holder):
        stored, counts = _encode_and_store(rt, shard_id, holder, job, progress, batch_size)
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


def _encode_and_store(rt, shard_id: int, holder: str, job: dict, progress, batch_size: int) -> tuple[int, Counter]:
    """The shard's work under its lease: (items stored, skip counts). A transient failure gives the lease back;
    any other fails the shard and its version."""
    from .backbone import get_backbone

    fmt, spec, dim = job["fmt"], job["spec"], job["dim"]
    try:
        backbone = None if fmt == "embeddings" else get_backbone(job["backbone"], rt.settings.device, rt.settings.offline)
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
            ids = [point_id(job["memory"], job["version"], k) for k in keys]
            shard_name = spec.get("name", str(shard_id))
            payloads = [{"key": k, "caption": c, "shard": shard_name, "shard_index": job["index"],
                         **({"src": src} if src else {})}
                        for k, c, src in zip(keys, caps, srcs)]
            chunks.append((ids, images, texts, payloads))
            stored += len(ids)
            if progress:
                processed = stored + sum(counts.values())
                progress(processed - reported)
                reported = processed
        with rt.store.hold(job["collection"], create_dim=dim, storage=job.get("storage")):
            for chunk in chunks:
                dup = _write_first_wins(rt.store, job["collection"], job["index"], *chunk)
                if dup:
                    counts[SkipReason.DUPLICATE_KEY] += dup
                    stored -= dup
    except (TransientError, OperationalError, ConnectionError):
        release(rt, shard_id, holder)  # the task retries, maybe on another worker
        raise
    except Exception as exc:
        fail_shard(rt, shard_id, str(exc) if isinstance(exc, RecoError) else f"{type(exc).__name__}: {exc}")
        raise
    return stored, counts


def _write_first_wins(store, collection: str, index: int, ids, images, texts, payloads) -> int:
    """Upsert a chunk, except items whose key an earlier shard (in source order) already stored: those stay the
    earlier shard's and count as duplicate keys here, as a repeated key inside one shard does. Returns how many
    were left out. A point a later shard wrote first is overwritten; `finalize_if_complete` then moves the count
    from that shard to its duplicates. (The embedded engine writes under a file lock, so check and write are one
    step; on a Qdrant server two shards writing one key at the same moment may leave the later one's copy, and
    the counts still come out exact.)"""
    held = {h.id: h.payload.get("shard_index") for h in store.retrieve(collection, ids)}
    keep = [i for i, pid in enumerate(ids) if held.get(pid) is None or held[pid] >= index]
    if keep:
        store.upsert(collection, [ids[i] for i in keep], images[keep], texts[keep], [payloads[i] for i in keep])
    return len(ids) - len(keep)
