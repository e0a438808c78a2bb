"""Shard leases and the sweeper: the metadata DB, not the broker, says whether a shard's work is alive.

A worker takes a shard by a conditional UPDATE (`claim`): pending, or running under a lease nobody renewed for
`lease_s` seconds. While it works, a thread renews the lease every `lease_s / 3` seconds (`Heartbeat`). The broker
only delivers; when it loses a message (a restart without persistence) or a worker dies under a long visibility
timeout, the shard's row says so, and the sweeper puts the shard back on the queue. Re-running a shard is safe: its
point ids are deterministic (app/ingest.py).

The sweeper (`app.sweeper.sweep`) runs in every worker (a thread, twice per lease period), in a waiting `reco memory
build`, and on demand (`reco memory resume`). Bounded: a shard taken `max_attempts` times without finishing ends
failed, with its version.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import OperationalError

from .db.models import IngestShard, MemoryVersion, ShardStatus, VersionStatus, Worker, utcnow
from .errors import TransientError

log = logging.getLogger(__name__)

STALE = "stale"  # a display state: running, but its lease was not renewed in time


def holder_name(worker: str | None = None) -> str:
    """Who holds a lease: the Celery worker's name, or this host and process for in-process work."""
    return f"{worker or socket.gethostname()}:{os.getpid()}"


def holder_gone(holder: str | None) -> bool:
    """True when the lease holder is a process of this host that no longer exists (a crashed in-process build):
    its lease need not be waited out."""
    if not holder:
        return True
    name, _, pid = holder.rpartition(":")
    if name.rpartition("@")[2] != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def aware(t: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes (stored as UTC)."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def shard_state(sh: IngestShard, lease_s: int, now: datetime | None = None) -> str:
    """pending, running (lease alive), stale (lease expired), done or failed."""
    if sh.status != ShardStatus.RUNNING:
        return sh.status
    beat = aware(sh.heartbeat_at)
    now = now or utcnow()
    return STALE if beat is None or now - beat > timedelta(seconds=lease_s) else ShardStatus.RUNNING


def lease_info(sh: IngestShard, lease_s: int, now: datetime | None = None) -> dict:
    """The lease fields `reco status` and `reco memory show` print."""
    now = now or utcnow()
    beat = aware(sh.heartbeat_at)
    state = shard_state(sh, lease_s, now)
    return {"state": state, "worker": sh.worker if sh.status == ShardStatus.RUNNING else None,
            "heartbeat_age_s": round((now - beat).total_seconds(), 1) if beat and state in ("running", STALE)
            else None,
            "stale_since": (beat + timedelta(seconds=lease_s)).isoformat() if state == STALE and beat else None}


def claim(rt, shard_id: int, holder: str) -> bool:
    """Take the shard if it is pending, or running under an expired lease, and its version is building."""
    now = utcnow()
    expired = now - timedelta(seconds=rt.settings.lease_s)
    building = select(MemoryVersion.id).where(MemoryVersion.status == VersionStatus.BUILDING)
    with rt.db.session() as s:
        return s.execute(
            update(IngestShard)
            .where(IngestShard.id == shard_id, IngestShard.version_id.in_(building),
                   or_(IngestShard.status == ShardStatus.PENDING,
                       and_(IngestShard.status == ShardStatus.RUNNING,
                            or_(IngestShard.heartbeat_at.is_(None), IngestShard.heartbeat_at < expired))))
            .values(status=ShardStatus.RUNNING, worker=holder, heartbeat_at=now, started_at=now,
                    attempts=IngestShard.attempts + 1)
            .execution_options(synchronize_session=False)
        ).rowcount == 1


def release(rt, shard_id: int, holder: str) -> None:
    """Give a shard back (a transient failure: its task retries, maybe elsewhere). Best effort: when the database
    is what failed, the lease simply expires."""
    try:
        with rt.db.session() as s:
            s.execute(update(IngestShard)
                      .where(IngestShard.id == shard_id, IngestShard.worker == holder,
                             IngestShard.status == ShardStatus.RUNNING)
                      .values(status=ShardStatus.PENDING, worker=None)
                      .execution_options(synchronize_session=False))
    except (TransientError, OperationalError, ConnectionError) as exc:
        log.warning("could not release shard %s (%s); its lease will expire", shard_id, exc)


class Heartbeat:
    """Renews a shard's lease from a thread while the shard is worked on (`with Heartbeat(rt, id, holder):`)."""

    def __init__(self, rt, shard_id: int, holder: str):
        self.rt, self.shard_id, self.holder = rt, shard_id, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reco-lease-{shard_id}", daemon=True)

    def _run(self) -> None:
        period = max(0.2, self.rt.settings.lease_s / 3)
        while not self._stop.wait(period):
            try:
                with self.rt.db.session() as s:
                    s.execute(update(IngestShard)
                              .where(IngestShard.id == self.shard_id, IngestShard.worker == self.holder)
                              .values(heartbeat_at=utcnow())
                              .execution_options(synchronize_session=False))
            except Exception as exc:  # noqa: BLE001 - the lease expires; the sweeper decides, not this thread
                log.warning("lease of shard %s not renewed: %s", self.shard_id, exc)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def beat_worker(rt, name: str, queues: str) -> None:
    """A worker says it is alive (its row in `workers`)."""
    now = utcnow()
    with rt.db.session() as s:
        w = s.get(Worker, name)
        if w is None:
            s.add(Worker(name=name, queues=queues, started_at=now, heartbeat_at=now))
        else:
            w.heartbeat_at, w.queues = now, queues


def forget_worker(rt, name: str) -> None:
    with rt.db.session() as s:
        w = s.get(Worker, name)
        if w is not None:
            s.delete(w)


def live_workers(rt) -> list[dict]:
    """Workers whose heartbeat is younger than two lease periods."""
    since = utcnow() - timedelta(seconds=2 * rt.settings.lease_s)
    with rt.db.session() as s:
        return [{"name": w.name, "queues": w.queues, "heartbeat_at": aware(w.heartbeat_at).isoformat()}
                for w in s.scalars(select(Worker).where(Worker.heartbeat_at >= since).order_by(Worker.name))]
