"""`reco memory build`: plan the shards, register the version, then run one ingest task per shard:
in-process in the embedded profile (with a progress bar), on Celery queue `ingest` in the distributed one (sent by
name through app/dispatch.py; the sweeper that sends lost shards again is app/sweeper.py).

Everything that can be checked up front is checked before the version row exists (source, columns, backbone,
dimensions, store and broker reachable), so a bad command leaves nothing behind.

A delta (`--from VERSION`, `--remove-keys FILE`) is a version whose first shard copies its parent inside the store
(app/ingest.py): only the new source is encoded, and the seal indexes only what the delta added. It runs that copy
before anything else, in this process in both profiles (the embedded engine copies the parent's files whole only
into a collection that does not exist yet); a copy lost with its process goes to the workers like any shard.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select, update

from .backbone import BackboneSpec
from .corpus import plan_shards
from .db.models import IngestShard, MemoryVersion, ShardStatus, VersionStatus, utcnow
from .dispatch import dispatcher
from .errors import RecoError
from .leases import holder_gone
from .memory import ONE_VERSION, create_version, get_version, is_copy, storage_of
from .names import check_name
from .store.base import Storage
from .sweeper import sweep, sweep_queued  # noqa: F401 - sweep: the sweeper's rules, imported from here by tests

log = logging.getLogger(__name__)


def start_build(rt, name: str, source: str | None, *, backbone: str | None = None, fmt: str | None = None,
                activate: bool = False, storage: Storage | None = None, parent: int | str | None = None,
                remove_keys: list[str] | None = None, reason: str = "", **reader_options) -> MemoryVersion:
    """Register the next version of NAME. With `parent` (a version number, or "active"): a delta of that version
    minus `remove_keys` (recorded as a takedown of scope `version`) plus SOURCE's items (None: nothing added); it
    keeps the parent's backbone and storage."""
    check_name(name)
    base = _parent(rt, name, parent) if parent is not None else None
    if base is None and (source is None or backbone is None):
        raise RecoError("a new version needs a SOURCE and --backbone (or --from VERSION for a delta)")
    if remove_keys and base is None:
        raise RecoError("--remove-keys removes items from a parent version: give --from VERSION")
    if base is not None:
        if storage is not None and storage != storage_of(base):
            raise RecoError(f"a delta keeps its parent's storage ({storage_of(base).quantization}"
                            f"{', on disk' if base.on_disk else ''}): leave out --quantization and --on-disk")
        storage = storage_of(base)
    spec = BackboneSpec.parse(backbone or base.backbone)
    if base is not None and spec.fingerprint != base.backbone_hash:
        raise RecoError(f"{name} v{base.version} was embedded with {base.backbone}, not {spec.canonical}: a delta "
                        "must use its parent's backbone (leave out --backbone)")
    dim = spec.dim
    if source is None:
        fmt, shards = "delta", []
    else:
        # the source first: a wrong path or format fails before torch and open_clip are imported (seconds)
        fmt, shards = plan_shards(source, fmt, **reader_options)
        if fmt == "embeddings":  # their dimension against the backbone's
            fmt, shards = plan_shards(source, fmt, dim=dim, **reader_options)
    rt.store.ping()
    if rt.settings.in_process_tasks and shards and fmt != "embeddings":
        from .backbone import get_backbone

        # the embedded build encodes in this process: a backbone that cannot load fails here, before a version
        # row exists (it is cached, so ingestion does not load it again)
        get_backbone(spec.canonical, rt.settings.device, rt.settings.offline)
    if not rt.settings.in_process_tasks and shards:
        dispatcher(rt).check()
    if source is None:
        source = f"{name} v{base.version}"
    elif Path(source).exists():
        source = str(Path(source).resolve())
    takedown_id = None
    if remove_keys:
        from . import takedown

        takedown_id = takedown.record(rt, name, remove_keys, ONE_VERSION, reason)
    v = create_version(
        rt, name, source=source, fmt=fmt, backbone=spec.canonical, backbone_hash=spec.fingerprint, dim=dim,
        shard_specs=shards, activate=activate, storage=storage or Storage(), parent=base, takedown_id=takedown_id,
    )
    if takedown_id is not None:
        from . import takedown

        takedown.built(rt, takedown_id, v.version)
    return v


def _parent(rt, name: str, parent: int | str) -> MemoryVersion:
    with rt.db.session() as s:
        base = get_version(s, name, None if parent == "active" else int(parent), active=parent == "active")
        if base.status not in VersionStatus.ACTIVATABLE:
            raise RecoError(f"{name} v{base.version} is {base.status}: a delta builds on a ready version")
        return base


def build_in_process(rt, name: str, source: str, *, backbone: str, activate: bool = False,
                     show_progress: bool = False, **options) -> MemoryVersion:
    """The embedded path in one call (the Python API's `reco memory build`): plan, register, ingest, finalize."""
    v = start_build(rt, name, str(source), backbone=backbone, activate=activate, **options)
    run_in_process(rt, v.id, show_progress=show_progress)
    return v


def shard_ids(rt, version_id: int, pending_only: bool = True, copies: bool | None = None) -> list[int]:
    """The version's shards (not done yet, with pending_only); copies: only the parent's copy (True), only the
    others (False)."""
    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        return [sh.id for sh in v.shards if (not pending_only or sh.status != ShardStatus.DONE)
                and (copies is None or is_copy(sh) == copies)]


def copy_here(rt, version_id: int, progress=None, retries: int = 3) -> None:
    """A delta's parent copy, in this process (both profiles), before its other shards start."""
    for sid in shard_ids(rt, version_id, copies=True):
        _with_retries(rt, sid, progress, retries)


def _with_retries(rt, shard_id: int, progress, retries: int) -> None:
    from .errors import TransientError
    from .ingest import run_shard

    for attempt in range(retries + 1):
        try:
            run_shard(rt, shard_id, progress=progress, finalize=False)
            return
        except TransientError:
            if attempt == retries:
                raise
            time.sleep(2**attempt)


def run_in_process(rt, version_id: int, show_progress: bool = True, retries: int = 3) -> None:
    """The embedded profile: the same task body, in this process, shard after shard, one progress bar."""
    from tqdm import tqdm

    from .memory import finalize_if_complete

    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        total = sum(sh.spec.get("rows", 0) for sh in v.shards) or None
        label = f"{v.memory.name} v{v.version}"
        collection, dim, storage = v.collection, v.dim, storage_of(v)
    bar = tqdm(total=total, unit="item", desc=f"ingest {label}", disable=not show_progress, dynamic_ncols=True)
    try:
        copy_here(rt, version_id, bar.update, retries)
        # one open of the new collection for every shard (the embedded engine loads and flushes a shard on
        # each open); nobody else reads a version that is still building, and it is released before sealing
        with rt.store.hold(collection, create_dim=dim, storage=storage):
            for sid in shard_ids(rt, version_id):
                _with_retries(rt, sid, bar.update, retries)
    finally:
        bar.close()
    finalize_if_complete(rt, version_id)


def enqueue(rt, version_id: int) -> list[str]:
    """Send every shard not done yet to the `ingest` queue; returns the task ids."""
    ids = shard_ids(rt, version_id)
    with rt.db.session() as s:
        s.execute(update(IngestShard).where(IngestShard.id.in_(ids)).values(queued_at=utcnow())
                  .execution_options(synchronize_session=False))
    d = dispatcher(rt)
    return [d.send("ingest_shard", sid) for sid in ids]


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
