"""`reco status`: what the system is doing now. Queue depths from the broker (distributed profile); workers from
their heartbeats in the metadata database (a busy solo worker cannot answer a broker ping) and the ping; building
versions, shards by lease state (running on a live worker, stale, pending, failed) and jobs from the database."""

from __future__ import annotations

from sqlalchemy import select

from .db.models import IngestShard, Memory, MemoryVersion, ModelStatus, ShardStatus, VersionStatus, FusionModel, utcnow
from .leases import STALE, lease_info, live_workers
from .settings import mask_url

QUEUES = ("ingest", "train")


def broker_status(rt, timeout: float = 1.0) -> dict:
    settings = rt.settings
    if settings.in_process_tasks:
        return {"profile": "embedded", "broker": "in-process", "workers": [], "queues": {}}
    from .dispatch import dispatcher

    d = dispatcher(rt)
    beating = live_workers(rt)
    pinged = d.workers_alive(timeout)
    out = {"profile": "distributed", "broker": mask_url(settings.broker_url),
           "workers": sorted({w["name"] for w in beating} | set(pinged)), "worker_heartbeats": beating,
           "queues": {}}
    try:
        out["queues"] = d.queue_depths(QUEUES, timeout)
    except Exception as exc:  # noqa: BLE001 - status must report, not fail
        out["error"] = f"broker unreachable: {type(exc).__name__}"
    return out


def job_status(rt, failed_limit: int = 20) -> dict:
    with rt.db.session() as s:
        versions = s.execute(
            select(Memory.name, MemoryVersion).join(MemoryVersion, MemoryVersion.memory_id == Memory.id)
            .where(MemoryVersion.status.in_([VersionStatus.BUILDING, VersionStatus.FINALIZING]))
            .order_by(MemoryVersion.id)).all()
        building = []
        now, lease = utcnow(), rt.settings.lease_s
        for name, v in versions:
            counts = {st: 0 for st in (ShardStatus.PENDING, ShardStatus.RUNNING, STALE, ShardStatus.DONE,
                                       ShardStatus.FAILED)}
            for sh in v.shards:
                state = lease_info(sh, lease, now)["state"]
                counts[state] = counts.get(state, 0) + 1
            building.append({"memory": name, "version": v.version, "status": v.status, "shards": counts,
                             "items_stored": sum(sh.items_stored or 0 for sh in v.shards),
                             "created_at": v.created_at.isoformat() if v.created_at else None})
        running_shards = s.execute(
            select(Memory.name, MemoryVersion.version, IngestShard)
            .join(MemoryVersion, IngestShard.version_id == MemoryVersion.id)
            .join(Memory, MemoryVersion.memory_id == Memory.id)
            .where(IngestShard.status == ShardStatus.RUNNING)).all()
        failed_versions = s.execute(
            select(Memory.name, MemoryVersion).join(MemoryVersion, MemoryVersion.memory_id == Memory.id)
            .where(MemoryVersion.status == VersionStatus.FAILED).order_by(MemoryVersion.id.desc())
            .limit(failed_limit)).all()
        models = s.scalars(select(FusionModel).where(
            FusionModel.status.in_([ModelStatus.TRAINING, ModelStatus.FAILED])).order_by(FusionModel.id)).all()
        return {
            "building_versions": building,
            "running_jobs": [{"kind": "ingest", "memory": n, "version": ver, "shard": sh.index,
                              "attempts": sh.attempts, **lease_info(sh, lease, now),
                              "started_at": sh.started_at.isoformat() if sh.started_at else None}
                             for n, ver, sh in running_shards]
                            + [{"kind": "train", "model": m.name, "step": m.step}
                               for m in models if m.status == ModelStatus.TRAINING],
            "failed_jobs": [{"kind": "ingest", "memory": n, "version": v.version, "error": v.error}
                            for n, v in failed_versions]
                           + [{"kind": "train", "model": m.name, "error": m.error}
                              for m in models if m.status == ModelStatus.FAILED],
        }


def status(rt, timeout: float = 1.0) -> dict:
    return {**broker_status(rt, timeout), **job_status(rt)}
