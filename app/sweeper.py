"""The sweeper: sends again the shards whose work is lost, fails those that keep getting lost, and seals versions
whose finaliser died (the rules are in `sweep`; the leases it reads are app/leases.py).

It runs in every worker (workers/celery_app.py: a thread, twice per lease period), in a waiting `reco memory
build` (`app.build.wait_for`), and on demand (`reco memory resume`). It sends through app/dispatch.py, by task name:
the library never imports workers/.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Callable

from sqlalchemy import select, update

from .db.models import IngestShard, MemoryVersion, ShardStatus, VersionStatus, utcnow
from .dispatch import dispatcher, task
from .leases import aware
from .memory import fail_shard, finalize_if_complete

log = logging.getLogger(__name__)


def sweep_queued(rt, version_id: int | None = None, force: bool = False) -> dict:
    """The sweeper for the distributed profile: asks the broker whether the ingest queue is empty, then re-queues
    the shards whose work is lost."""
    d = dispatcher(rt)
    depth = d.queue_depth(task("ingest_shard").queue)
    return sweep(rt, lambda shard_id: d.send("ingest_shard", shard_id),
                 queue_empty=None if depth is None else depth == 0, version_id=version_id, force=force)


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
