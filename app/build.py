"""`reco memory build`: plan the shards, register the version, then run one ingest task per shard:
in-process in the embedded profile (with a progress bar), on Celery queue `ingest` in the distributed one.

Everything that can be checked up front is checked before the version row exists (source, columns, backbone,
dimensions, store and broker reachable), so a bad command leaves nothing behind.
"""

from __future__ import annotations

import time
from pathlib import Path

from .backbone import BackboneSpec
from .corpus import plan_shards
from .db.models import IngestShard, MemoryVersion, ShardStatus, VersionStatus
from .errors import RecoError
from .memory import create_version
from .names import check_name


def start_build(rt, name: str, source: str, *, backbone: str, fmt: str | None = None, activate: bool = False,
                **reader_options) -> MemoryVersion:
    check_name(name)
    spec = BackboneSpec.parse(backbone)
    dim = spec.dim
    fmt, shards = plan_shards(source, fmt, dim=dim, **reader_options)
    rt.store.ping()
    if not rt.settings.in_process_tasks:
        from workers.celery_app import check_broker

        check_broker()
    if Path(source).exists():
        source = str(Path(source).resolve())
    return create_version(
        rt, name, source=source, fmt=fmt, backbone=spec.canonical, backbone_hash=spec.fingerprint, dim=dim,
        shard_specs=shards, activate=activate,
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
    from .ingest import finalize_if_complete, run_shard

    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        total = sum(sh.spec.get("rows", 0) for sh in v.shards) or None
        label = f"{v.memory.name} v{v.version}"
        collection, dim = v.collection, v.dim
    bar = tqdm(total=total, unit="item", desc=f"ingest {label}", disable=not show_progress, dynamic_ncols=True)
    try:
        # one open of the new collection for every shard (the embedded engine loads and flushes a shard on
        # each open); nobody else reads a version that is still building, and it is released before sealing
        with rt.store.hold(collection, create_dim=dim):
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


def enqueue(rt, version_id: int) -> list[str]:
    from workers.tasks import ingest_shard

    return [ingest_shard.apply_async(args=(sid,), queue="ingest").id for sid in shard_ids(rt, version_id)]


def wait_for(rt, version_id: int, timeout: float | None = None, show_progress: bool = True, poll: float = 1.0) -> str:
    """Poll the metadata DB until the version leaves building/finalizing; returns the final status."""
    from tqdm import tqdm

    start = time.monotonic()
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
            if timeout is not None and time.monotonic() - start > timeout:
                raise RecoError(f"version still {status} after {timeout:.0f}s ({done}/{total} shards done)")
            time.sleep(poll)
    finally:
        if bar is not None:
            bar.close()
