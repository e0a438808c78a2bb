"""Ingestion of one shard: read, decode, encode, upsert (the store confirms), mark done. The Celery task in
workers/tasks.py and the embedded profile's in-process runner both call `run_shard`.

Idempotent: point ids are UUIDv5(memory, version, key), so a shard that runs twice (a redelivered message, a
worker killed half-way) overwrites its own points and the memory ends with each item exactly once.

A delta version's first shard is its parent's copy (`spec.copy_from`): the parent's points, vectors and index
copied inside the store, never encoded, minus the removed and forgotten keys.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter, deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import numpy as np
from sqlalchemy.exc import OperationalError

from .corpus import Item, SkipReason, read_shard
from . import decode
from .db.models import IngestShard, Memory, ShardStatus, utcnow
from .errors import RecoError, TransientError
from .leases import Heartbeat, claim, holder_name, release
from .memory import fail_shard, finalize_if_complete, forgotten_keys, removed_keys, storage_of
from .store.base import point_id

BATCH_SIZE = 128  # items per backbone call on the CPU
DEVICE_BATCH_SIZE = 1024  # on an accelerator


def encode_batch(setting: int | None, device: str | None) -> int:
    """Items per backbone call (RECO_ENCODE_BATCH; None = auto). Auto: 128 when the CPU encodes (torch's threads
    are busy at that size already, and a shard's encoded vectors stay small) and when nothing is encoded
    (embeddings); 1024 on an accelerator, whose towers need large batches to run near their peak (an H200 encodes
    ~18,000 images/s at 1024)."""
    if setting is not None:
        return setting
    return BATCH_SIZE if device is None or str(device).startswith("cpu") else DEVICE_BATCH_SIZE


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


def _read(fmt: str, spec: dict, forgotten: frozenset) -> Iterator[Item]:
    """The shard's items, a forgotten key skipped as such before anything is decoded."""
    for it in read_shard(fmt, spec):
        if not it.skip and it.key in forgotten:
            it.skip = SkipReason.FORGOTTEN
        yield it


def _prepared(fmt: str, spec: dict, backbone, counts: Counter, batch_size: int,
              pool: "decode.DecodePool | None" = None, forgotten: frozenset = frozenset()) -> Iterator[tuple]:
    """Batches of (keys, captions, sources, pixels or image vectors, caption tokens or text vectors), in source
    order, skips counted. The pool decodes, preprocesses and tokenizes up to `pool.lookahead` batches ahead of the
    one handed out (None: inline); the first occurrence of a key that decodes wins, as without a pool."""
    if backbone is None:
        yield from _precomputed(fmt, spec, counts, batch_size, forgotten)
        return
    pool = pool or decode.DecodePool(backbone.preprocess, backbone.tokenizer)
    seen: set[str] = set()
    pending: deque = deque()
    for batch in _batches(_read(fmt, spec, forgotten), batch_size):
        todo = []
        for it in batch:
            if it.skip:
                counts[it.skip] += 1
            elif it.key in seen:  # stored by an earlier batch already
                counts[SkipReason.DUPLICATE_KEY] += 1
            else:
                todo.append(it)
        pending.append((todo, pool.submit([it.image_bytes for it in todo], [it.caption for it in todo])))
        while len(pending) > pool.lookahead:
            yield from _collect(*pending.popleft(), seen, counts)
    while pending:
        yield from _collect(*pending.popleft(), seen, counts)


def _collect(todo: list[Item], future, seen: set[str], counts: Counter) -> Iterator[tuple]:
    """Account one prepared batch in source order: a key seen before is a duplicate, an image that did not
    decode is corrupt; the rest keep their rows."""
    prep = future.result()
    keys, caps, srcs, rows, token_rows = [], [], [], [], []
    row = -1
    for i, (it, ok) in enumerate(zip(todo, prep.ok)):
        row += ok
        if it.key in seen:
            counts[SkipReason.DUPLICATE_KEY] += 1
        elif not ok:
            counts[SkipReason.CORRUPT_IMAGE] += 1
        else:
            seen.add(it.key)
            keys.append(it.key)
            caps.append(it.caption)
            srcs.append(it.src)
            rows.append(row)
            token_rows.append(i)
    if not keys:
        return
    pixels = prep.pixels if len(rows) == len(prep.pixels) else prep.pixels[rows]
    tokens = prep.tokens if len(token_rows) == len(todo) else prep.tokens[token_rows]
    yield keys, caps, srcs, pixels, tokens


def _precomputed(fmt: str, spec: dict, counts: Counter, batch_size: int,
                 forgotten: frozenset = frozenset()) -> Iterator[tuple]:
    """Batches of an embeddings corpus: (keys, captions, sources, image vectors, text vectors)."""
    seen: set[str] = set()
    for batch in _batches(_read(fmt, spec, forgotten), batch_size):
        keys, caps, srcs, img_embs, txt_embs = [], [], [], [], []
        for it in batch:
            if it.skip:
                counts[it.skip] += 1
            elif it.key in seen:
                counts[SkipReason.DUPLICATE_KEY] += 1
            else:
                seen.add(it.key)
                keys.append(it.key)
                caps.append(it.caption)
                srcs.append(it.src)
                img_embs.append(it.image_emb)
                txt_embs.append(it.text_emb)
        if keys:
            yield keys, caps, srcs, np.stack(img_embs), np.stack(txt_embs)


def run_shard(rt, shard_id: int, progress: Callable[[int], None] | None = None, batch_size: int | None = None,
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
               "storage": storage_of(v), "forgotten": forgotten_keys(s, mem.id)}
        if "copy_from" in job["spec"]:
            job["forgotten"] |= removed_keys(s, job["spec"].get("takedown"))
        version_id = v.id
    if not claim(rt, shard_id, holder):  # done, failed, no longer building, or held by a live worker
        with rt.db.session() as s:
            shard = s.get(IngestShard, shard_id)
            return {"shard": shard_id, "status": shard.status, "held_by": shard.worker, "skipped_run": True}
    with Heartbeat(rt, shard_id, holder):
        work = _copy_parent if "copy_from" in job["spec"] else _encode_and_store
        stored, counts = work(rt, shard_id, holder, job, progress, batch_size)
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


def _copy_parent(rt, shard_id: int, holder: str, job: dict, progress, batch_size: int | None) -> tuple[int, Counter]:
    """A delta's first shard: the parent version's points copied inside the store (app/store: the embedded engine
    copies its sealed files, graph included), then the removed and forgotten keys deleted. Nothing is encoded.
    Returns (points copied, {"removed": parent points left out})."""
    source = job["spec"]["copy_from"]
    with _failing_the_shard(rt, shard_id, holder), rt.store.hold(source):  # one open of the parent for all of it
        parent = rt.store.count(source)
        stored = rt.store.copy(source, job["collection"], exclude_keys=sorted(job["forgotten"]))
        if progress:
            progress(parent)
    removed = parent - stored
    return stored, Counter({SkipReason.REMOVED: removed} if removed else {})


@contextmanager
def _failing_the_shard(rt, shard_id: int, holder: str) -> Iterator[None]:
    """A transient failure gives the lease back (the task retries, maybe on another worker); any other fails the
    shard and its version."""
    try:
        yield
    except (TransientError, OperationalError, ConnectionError):
        release(rt, shard_id, holder)
        raise
    except Exception as exc:
        fail_shard(rt, shard_id, str(exc) if isinstance(exc, RecoError) else f"{type(exc).__name__}: {exc}")
        raise


def _encode_and_store(rt, shard_id: int, holder: str, job: dict, progress,
                      batch_size: int | None) -> tuple[int, Counter]:
    """The shard's work under its lease: (items stored, skip counts)."""
    from .backbone import get_backbone

    fmt, spec, dim = job["fmt"], job["spec"], job["dim"]
    with _failing_the_shard(rt, shard_id, holder):
        backbone = None if fmt == "embeddings" else get_backbone(job["backbone"], rt.settings.device, rt.settings.offline)
        counts: Counter = Counter()
        chunks, stored, reported = [], 0, 0
        # encode the whole shard first, then write it under one open of the collection: an embedded shard is
        # locked only while writing, and a worker that dies while encoding has written nothing
        device = None if backbone is None else backbone.device
        batch_size = batch_size or encode_batch(rt.settings.encode_batch, device)
        pool = None if backbone is None else decode.decode_pool(
            backbone, decode.decode_workers(rt.settings.decode_workers, device))
        batches = _prepared(fmt, spec, backbone, counts, batch_size, pool, job["forgotten"])
        if _overlap(backbone):
            batches = _prefetch(batches)
        for keys, caps, srcs, images, texts in batches:
            if backbone is not None:  # pixels and caption tokens
                texts = backbone.encode_tokens(texts)
                images = backbone.encode_image_tensor(images)
            if images.shape[1] != dim:
                raise RecoError(f"vectors have dimension {images.shape[1]}, the memory expects {dim}")
            ids = [point_id(job["memory"], job["version"], k) for k in keys]
            shard_name = spec.get("name", str(shard_id))
            payloads = [{"key": k, "caption": c, "shard": shard_name, "shard_index": job["index"],
                         "version": job["version"], **({"src": src} if src else {})}
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
