"""`reco memory build`: plan the shards, register the version, then run one ingest task per shard:
in-process in the embedded profile (with a progress bar), on Celery queue `ingest` in the distributed one.

Everything that can be checked up front is checked before the version row exists (source, columns, backbone,
dimensions, store and broker reachable), so a bad command leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable

from sqlalchemy import select, update

from .backbone import BackboneSpec
from .corpus import plan_shards

from .db.models import IngestShard, MemoryVersion, ShardStatus, VersionStatus, utcnow
from .errors import RecoError
from .leases import aware, holder_gone
from .memory import create_version, fail_shard, finalize_if_complete, storage_of
from .names import check_name
from .store.base import Storage

log = logging.getLogger(__name__)


def start_build(rt, name: str, source: str, *, backbone: str, fmt: str | None = None, activate: bool = False,
                storage: Storage | None = None, **reader_options) -> MemoryVersion:
    check_name(name)
    # the source first: a wrong path or format fails before torch and open_clip are imported (seconds)
    fmt, shards = plan_shards(source, fmt, **reader_options)
    spec = BackboneSpec.parse(backbone)
    dim = spec.dim
    if fmt == "embeddings":  # their dimension against the backbone's
        fmt, shards = plan_shards(source, fmt, dim=dim, **reader_options)
    rt.store.ping()
    if rt.settings.in_process_tasks and fmt != "embeddings":
        from .backbone import get_backbone

        # the embedded build encodes in this process: a backbone that cannot load fails here, before a version
        # row exists (it is cached, so ingestion does not load it again)
        get_backbone(spec.canonical, rt.settings.device, rt.settings.offline)
    if not rt.settings.in_process_tasks:
        from workers.celery_app import check_broker

        check_broker()
    if Path(source).exists():
        source = str(Path(source).resolve())
    return create_version(
        rt, name, source=source, fmt=fmt, backbone=spec.canonical, backbone_hash=spec.fingerprint, dim=dim,
        shard_specs=shards, activate=activate, storage=storage,
    )


def build_in_process(rt, name: str, source: str, *, backbone: str, activate: bool = False,
                     show_progress: bool = False, **options) -> MemoryVersion:
    """The embedded path in one call (the Python API's `reco memory build`): plan, register, ingest, finalize."""
    v = start_build(rt, name, str(source), backbone=backbone, activate=activate, **options)
    run_in_process(rt, v.id, show_progress=show_progress)
    return v


def shard_ids(rt, version_id: int, pending_only: bool = True) -> list[int]:
    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        return [sh.id for sh in v.shards if not pending_only or sh.status != ShardStatus.DONE]


def run_in_process(rt, version_id: int, show_progress: bool = True, retries: int = 3) -> None:
    """The embedded profile: the same task body, in this process, shard after shard, one progress bar."""
    from tqdm import tqdm

    from .errors import TransientError
    from .ingest import run_shard
    from .memory import finalize_if_complete

    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        total = sum(sh.spec.get("rows", 0) for sh in v.shards) or None
        label = f"{v.memory.name} v{v.version}"
        collection, dim, storage = v.collection, v.dim, storage_of(v)
    bar = tqdm(total=total, unit="item", desc=f"ingest {label}", disable=not show_progress, dynamic_ncols=True)
    try:
        # one open of the new collection for every shard (the embedded engine loads and flushes a shard on
        # each open); nobody else reads a version that is still building, and it is released before sealing
        with rt.store.hold(collection, create_dim=dim, storage=storage):
            for sid in shard_ids(rt, version_id):
                for attempt in range(retries + 1):
                    try:
                        run_shard(rt, sid, progress=bar.update, finalize=False)
                        break
                    except TransientError:
                        if attempt == retries:
                            raise
                        time.sleep(2**attempt)
    finally:
        bar.close()
    finalize_if_complete(rt, version_id)


def send_shard(shard_id: int) -> str:
    """Put one shard's task on the `ingest` queue."""
    from workers.tasks import ingest_shard

    return ingest_shard.apply_async(args=(shard_id,), queue="ingest").id


def enqueue(rt, version_id: int) -> list[str]:
    ids = shard_ids(rt, version_id)
    with rt.db.session() as s:
        s.execute(update(IngestShard).where(IngestShard.id.in_(ids)).values(queued_at=utcnow())
                  .execution_options(synchronize_session=False))
    return [send_shard(sid) for sid in ids]


def sweep_queued(rt, version_id: int | None = None, force: bool = False) -> dict:
    """The sweeper for the distributed profile: asks the broker whether the ingest queue is empty, then re-queues
    the shards whose work is lost (app/leases.py)."""
    from workers.celery_app import queue_depth

    depth = queue_depth("ingest")
    return sweep(rt, send_shard, queue_empty=None if depth is None else depth == 0, version_id=version_id,
                 force=force)


def sweep(rt, send: Callable[[int], object], queue_empty: bool | None, version_id: int | None = None,
          force: bool = False) -> dict:
    """Re-queue the shards of building versions whose work is lost; fail those that keep getting lost.

    - running with an expired lease: back to pending and re-queued, or failed after `max_attempts` takes;
    - pending, queued more than one lease period ago, while the queue holds no message (`queue_empty`): its
      message is gone, re-queued; pending for longer than the visibility timeout: re-queued whatever the queue
      says (the broker could not be asked, or other builds keep it busy);
    - every shard done but the version still building (its finaliser died before the flip): finalized.
    `force` (an operator's `reco memory resume`) re-queues every pending and stale shard now. Each re-queue is a
    conditional UPDATE of the shard's `queued_at`, so two sweepers never both send it. Returns the counts.
    """
    st = rt.settings
    now = utcnow()
    expired = now - timedelta(seconds=st.lease_s)
    gone = now - timedelta(seconds=st.visibility_timeout)
    out = {"requeued": 0, "failed": 0, "finalized": 0}
    with rt.db.session() as s:
        q = select(MemoryVersion.id).where(MemoryVersion.status == VersionStatus.BUILDING)
        versions = s.scalars(q if version_id is None else q.where(MemoryVersion.id == version_id)).all()
        rows = s.execute(select(IngestShard.id, IngestShard.version_id, IngestShard.status, IngestShard.heartbeat_at,
                                IngestShard.queued_at, IngestShard.attempts, IngestShard.error)
                         .where(IngestShard.version_id.in_(versions))).all() if versions else []
    for vid in versions:
        if rows and all(r.status == ShardStatus.DONE for r in rows if r.version_id == vid):
            out["finalized"] += finalize_if_complete(rt, vid) is not None
    # failures first: a version that fails now sends none of its other shards again
    for r in sorted(rows, key=lambda r: (r.status != ShardStatus.RUNNING or (r.attempts or 0) < st.max_attempts, r.id)):
        beat, queued = aware(r.heartbeat_at), aware(r.queued_at)
        if r.status == ShardStatus.RUNNING and (beat is None or beat < expired):
            if (r.attempts or 0) >= st.max_attempts:
                fail_shard(rt, r.id, f"taken {r.attempts} times without finishing (worker lost or message lost "
                                     f"each time); last error: {r.error or 'none recorded'}")
                out["failed"] += 1
                continue
            cond = [IngestShard.status == ShardStatus.RUNNING,
                    IngestShard.heartbeat_at.is_(None) if beat is None else IngestShard.heartbeat_at == r.heartbeat_at]
        elif r.status == ShardStatus.PENDING and (
                force or queued is None or queued < gone or (queue_empty and queued < expired)):
            cond = [IngestShard.status == ShardStatus.PENDING,
                    IngestShard.queued_at.is_(None) if queued is None else IngestShard.queued_at == r.queued_at]
        else:
            continue
        with rt.db.session() as s:
            took = s.execute(update(IngestShard).where(IngestShard.id == r.id, *cond, IngestShard.version_id.in_(
                select(MemoryVersion.id).where(MemoryVersion.status == VersionStatus.BUILDING)))
                             .values(status=ShardStatus.PENDING, worker=None, queued_at=utcnow())
                             .execution_options(synchronize_session=False)).rowcount == 1
        if took:
            send(r.id)
            out["requeued"] += 1
    if out["requeued"] or out["failed"]:
        log.warning("sweeper: %(requeued)d shard(s) re-queued, %(failed)d failed", out)
    return out


def resume(rt, name: str, version: int | None = None) -> dict:
    """`reco memory resume`: a building version's lost shards back to work now; a failed version's shards (and the
    version) back to building first. Shards on a live lease are left alone. Embedded: runs them here."""
    from .memory import get_version

    with rt.db.session() as s:
        v = get_version(s, name, version)
        if v.status == VersionStatus.FAILED:
            for sh in v.shards:
                if sh.status != ShardStatus.DONE:
                    sh.status, sh.attempts, sh.worker = ShardStatus.PENDING, 0, None
            v.status, v.error = VersionStatus.BUILDING, None
        elif v.status not in (VersionStatus.BUILDING, VersionStatus.FINALIZING):
            raise RecoError(f"{name} v{v.version} is {v.status}: only a building or failed version is resumed")
        version_id, number, status = v.id, v.version, v.status
    if status == VersionStatus.FINALIZING:
        raise RecoError(f"{name} v{number} is finalizing: every shard is done; if its finaliser died, run "
                        f"`reco memory finalize {name} {number}`")
    if rt.settings.in_process_tasks:
        with rt.db.session() as s:  # a crashed `reco memory build` of this host left its shard leased
            for sh in s.scalars(select(IngestShard).where(IngestShard.version_id == version_id,
                                                          IngestShard.status == ShardStatus.RUNNING)):
                if holder_gone(sh.worker):
                    sh.status, sh.worker = ShardStatus.PENDING, None
        run_in_process(rt, version_id)
        return {"ran_in_process": True, "version": number, "version_id": version_id}
    return {**sweep_queued(rt, version_id, force=True), "version": number, "version_id": version_id}


def wait_for(rt, version_id: int, timeout: float | None = None, show_progress: bool = True, poll: float = 1.0,
             sweep_every: float | None = None) -> str:
    """Poll the metadata DB until the version leaves building/finalizing; returns the final status. sweep_every:
    run the sweeper that often meanwhile (distributed profile)."""
    from tqdm import tqdm

    start = swept = time.monotonic()
    bar = None
    try:
        while True:
            with rt.db.session() as s:
                v = s.get(MemoryVersion, version_id)
                status = v.status
                done = sum(sh.status == ShardStatus.DONE for sh in v.shards)
                total = len(v.shards)
            if bar is None:
                bar = tqdm(total=total, unit="shard", desc="ingest", disable=not show_progress, dynamic_ncols=True)
            if done > bar.n:
                bar.update(done - bar.n)
            if status not in (VersionStatus.BUILDING, VersionStatus.FINALIZING):
                return status
            if sweep_every and time.monotonic() - swept > sweep_every:  # lost shards come back while we wait
                try:
                    sweep_queued(rt, version_id)
                except Exception as exc:  # noqa: BLE001 - a broker or database outage: the workers sweep too
                    from .settings import scrub

                    log.warning("sweeper: %s", scrub(str(exc), rt.settings.broker_url, rt.settings.database_url))
                swept = time.monotonic()
            if timeout is not None and time.monotonic() - start > timeout:
                raise RecoError(f"version still {status} after {timeout:.0f}s ({done}/{total} shards done)")
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()
