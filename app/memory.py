"""Memory versions: create, resolve, activate (atomic swap), verify, delete, query.

The metadata DB is the source of truth for which version is active in both profiles; on a Qdrant server the
alias `reco-NAME` is switched too, in one atomic request, for clients that read Qdrant directly.

A class set (app/classes.py) is versioned the same way: a memory row of kind `classes`. Memories and class sets
share one namespace, and every lookup names the kind it wants, so one is never read as the other.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from .db.models import (IngestShard, Memory, MemoryVersion, ShardStatus, Takedown, TakedownKey, TakedownStatus,
                        VersionStatus, utcnow)
from .errors import NotFound, RecoError
from .leases import STALE, shard_state
from .names import check_name
from .store.base import Storage, collection_name


MEMORY, CLASSES = "memory", "classes"
ALL_VERSIONS, ONE_VERSION = "all-versions", "version"  # takedown scopes
_NOUN = {MEMORY: ("memory", "reco memory"), CLASSES: ("class set", "reco classes")}  # kind -> (word, command)


def alias_name(memory: str) -> str:
    return f"reco-{memory}"


def create_version(rt, name: str, *, source: str, fmt: str, backbone: str, backbone_hash: str | None, dim: int,
                   shard_specs: list[dict], activate: bool = False, storage: Storage | None = None,
                   kind: str = MEMORY, details: dict | None = None, parent: MemoryVersion | None = None,
                   takedown_id: int | None = None) -> MemoryVersion:
    """Register the next version of NAME with its shards. Concurrent builds get distinct numbers. With `parent`,
    a delta: shard 0 copies the parent's points (minus the keys of takedown `takedown_id`), the rest add."""
    check_name(name)
    for attempt in range(20):
        try:
            with rt.db.session() as s:
                mem = s.scalar(select(Memory).where(Memory.name == name))
                if mem is None:
                    mem = Memory(name=name, kind=kind)
                    s.add(mem)
                    s.flush()
                _check_kind(mem, kind)
                number = (s.scalar(select(func.max(MemoryVersion.version)).where(MemoryVersion.memory_id == mem.id)) or 0) + 1
                v = MemoryVersion(
                    memory_id=mem.id, version=number, status=VersionStatus.BUILDING, backbone=backbone,
                    backbone_hash=backbone_hash, dim=dim, source=source, source_format=fmt,
                    collection=collection_name(name, number), activate_when_ready=int(activate),
                    items_stored=0, items_skipped=0, quantization=(storage or Storage()).quantization,
                    on_disk=(storage or Storage()).on_disk, details=details, items_forgotten=0,
                    parent_version=parent.version if parent is not None else None,
                )
                s.add(v)
                s.flush()
                if parent is not None:
                    shard_specs = [{"name": f"v{parent.version} (copy)", "copy_from": parent.collection,
                                    "rows": parent.items_stored, "takedown": takedown_id}, *shard_specs]
                for i, spec in enumerate(shard_specs):
                    s.add(IngestShard(version_id=v.id, index=i, spec=spec, status=ShardStatus.PENDING,
                                      items_stored=0, items_skipped=0, skip_reasons={}, attempts=0))
                return v
        except IntegrityError:
            continue  # another build took this number (or created the memory) first: take the next one
    raise RecoError(f"could not allocate a new version of {name}: too many concurrent builds")


def forgotten_keys(s, memory_id: int) -> frozenset:
    """Keys taken down from every version of a memory: no later build, copy or export of it holds them."""
    return frozenset(s.scalars(select(TakedownKey.key).join(Takedown).where(
        Takedown.memory_id == memory_id, Takedown.scope == ALL_VERSIONS)).all())


def removed_keys(s, takedown_id: int | None) -> frozenset:
    """The keys of one takedown (a delta's `--remove-keys`)."""
    if takedown_id is None:
        return frozenset()
    return frozenset(s.scalars(select(TakedownKey.key).where(TakedownKey.takedown_id == takedown_id)).all())


def unfinished_takedowns(s, memory_id: int) -> list[Takedown]:
    return list(s.scalars(select(Takedown).where(Takedown.memory_id == memory_id,
                                                 Takedown.status != TakedownStatus.DONE).order_by(Takedown.id)))


def is_copy(shard: IngestShard) -> bool:
    return "copy_from" in (shard.spec or {})


def storage_of(v: MemoryVersion) -> Storage:
    """The storage options a version was built with."""
    return Storage(v.quantization or "none", bool(v.on_disk))


def _check_kind(mem: Memory, kind: str) -> None:
    if (mem.kind or MEMORY) != kind:
        word, command = _NOUN[mem.kind or MEMORY]
        raise RecoError(f"{mem.name} is a {word}, not a {_NOUN[kind][0]} (see `{command} show {mem.name}`); "
                        f"memories and class sets share one namespace, so pick another name")


def get_memory(s, name: str, kind: str = MEMORY) -> Memory:
    mem = s.scalar(select(Memory).where(Memory.name == check_name(name)))
    if mem is None:
        word, command = _NOUN[kind]
        raise NotFound(f"no {word} named {name!r} (see `{command} list`)")
    _check_kind(mem, kind)
    return mem


def get_version(s, name: str, version: int | None = None, *, active: bool = False,
                kind: str = MEMORY) -> MemoryVersion:
    """A version by number; without a number, the active one (active=True) or the newest."""
    mem = get_memory(s, name, kind)
    word, command = _NOUN[kind]
    if version is None:
        if active or mem.active_version_id is not None:
            if mem.active_version_id is None:
                raise RecoError(f"{word} {name} has no active version: run `{command} activate {name} VERSION`")
            return s.get(MemoryVersion, mem.active_version_id)
        v = s.scalar(select(MemoryVersion).where(MemoryVersion.memory_id == mem.id).order_by(MemoryVersion.version.desc()))
    else:
        v = s.scalar(select(MemoryVersion).where(MemoryVersion.memory_id == mem.id, MemoryVersion.version == version))
    if v is None:
        raise NotFound(f"{word} {name} has no version {version} (see `{command} show {name}`)")
    return v


def activate(rt, name: str, version: int, kind: str = MEMORY) -> MemoryVersion:
    with rt.db.session() as s:
        mem = get_memory(s, name, kind)
        v = get_version(s, name, version, kind=kind)
        if v.status not in VersionStatus.ACTIVATABLE:
            raise RecoError(f"{name} v{version} is {v.status}, not ready: only a ready version can be activated")
        previous = mem.active_version_id
        rt.store.point_alias(alias_name(name), v.collection)
        mem.active_version_id = v.id
        v.status = VersionStatus.READY
        v.activated_at = utcnow()
        if previous and previous != v.id:
            s.execute(update(MemoryVersion).where(MemoryVersion.id == previous).values(status=VersionStatus.RETIRED))
        return v


def resolve_collection(rt, name: str, version: int | None = None, kind: str = MEMORY) -> tuple[str, MemoryVersion]:
    """The collection a query should read now: one DB read, so a query sees wholly one version."""
    with rt.db.session() as s:
        v = get_version(s, name, version, active=version is None, kind=kind)
        if v.status not in VersionStatus.ACTIVATABLE:
            raise RecoError(f"{name} v{v.version} is {v.status}: only ready versions can be queried")
        return v.collection, v


def check_complete(rt, name: str, collection: str, v: MemoryVersion) -> None:
    """Refuse to read a version whose collection holds fewer points than it recorded (a data segment lost or
    deleted): its answers would silently come from what is left."""
    n = rt.store.count(collection)
    if n < (v.items_stored or 0):
        raise RecoError(f"memory {name} v{v.version} is damaged: the vector store holds {n} of its "
                        f"{v.items_stored} points. `reco memory verify {name} --version {v.version}` shows the "
                        f"mismatch; rebuild the version or activate another one")


@dataclass
class VerifyReport:
    memory: str
    version: int
    status: str
    metadata_count: int
    shard_sum: int
    store_count: int
    shards_done: int
    shards_total: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(rt, name: str, version: int | None = None, kind: str = MEMORY) -> VerifyReport:
    with rt.db.session() as s:
        v = get_version(s, name, version, kind=kind)
        shards = list(v.shards)
        mem = get_memory(s, name, kind)
        is_active = mem.active_version_id == v.id
        problems = [f"takedown #{t.id} ({t.keys_count} keys) is {t.status}"
                    f"{': ' + t.error if t.error else ''}; `reco memory forget {name} --resume` finishes it"
                    for t in unfinished_takedowns(s, mem.id)]
    # the store holds what the shards stored minus what takedowns deleted in place since
    shard_sum = sum(sh.items_stored or 0 for sh in shards) - (v.items_forgotten or 0)
    done = sum(sh.status == ShardStatus.DONE for sh in shards)
    store_count = _store_count(rt, v)
    if v.status == VersionStatus.FAILED:
        problems.append(f"version failed: {v.error}")
    elif v.status in (VersionStatus.BUILDING, VersionStatus.FINALIZING):
        states = Counter(shard_state(sh, rt.settings.lease_s) for sh in shards)
        detail = ", ".join(f"{n} {st}" for st, n in sorted(states.items()) if st != ShardStatus.DONE)
        hint = ""
        if states[STALE] or states[ShardStatus.PENDING]:
            hint = f"; `reco memory resume {name} {v.version}` re-queues stale and lost shards"
        elif v.status == VersionStatus.FINALIZING:
            hint = f"; if its finaliser died, `reco memory finalize {name} {v.version}`"
        problems.append(f"not ready: {v.status}, {done}/{len(shards)} shards done"
                        f"{' (' + detail + ')' if detail else ''}{hint}")
    if done != len(shards) and v.status in VersionStatus.ACTIVATABLE:
        problems.append(f"{len(shards) - done} shard(s) not done in a {v.status} version")
    if v.status in VersionStatus.ACTIVATABLE and (v.items_stored or 0) != shard_sum:
        problems.append(f"version row says {v.items_stored} items, its shards (less {v.items_forgotten or 0} taken "
                        f"down) add up to {shard_sum}")
    if store_count != shard_sum and v.status != VersionStatus.BUILDING:
        problems.append(f"the vector store holds {store_count} points, the metadata {shard_sum}")
    if is_active and hasattr(rt.store, "alias_target"):
        target = rt.store.alias_target(alias_name(name))
        if target != v.collection:
            problems.append(f"alias {alias_name(name)} points at {target}, the active version is {v.collection}")
    return VerifyReport(name, v.version, v.status, v.items_stored or 0, shard_sum, store_count, done, len(shards), problems)


def _store_count(rt, v: MemoryVersion) -> int:
    """Points in the version's collection. A failed build may have left one the engine cannot open (it ran out of
    disk while creating it), and so may a building one whose worker was killed before the engine wrote its first
    segment: for those it counts as none, the failure or the "not ready" line is the report (a building version's
    count is not compared)."""
    if not rt.store.exists(v.collection):
        return 0
    try:
        return rt.store.count(v.collection)
    except Exception:
        if v.status in (VersionStatus.FAILED, VersionStatus.BUILDING):
            return 0
        raise


def finalize(rt, name: str, version: int) -> str:
    """Finish a version whose shards are all done but which is not ready: its finaliser died mid-seal (the
    version stays `finalizing`). Sealing again is safe; run it only when that finaliser is gone."""
    with rt.db.session() as s:
        v = get_version(s, name, version)
        if v.status not in (VersionStatus.BUILDING, VersionStatus.FINALIZING):
            raise RecoError(f"{name} v{version} is {v.status}: only a building or finalizing version is finalized")
        pending = sum(sh.status != ShardStatus.DONE for sh in v.shards)
        if pending:
            raise RecoError(f"{name} v{version} has {pending} shard(s) not done: their tasks must finish first "
                            f"(see `reco memory show {name} --version {version}`)")
        version_id = v.id
        s.execute(update(MemoryVersion).where(MemoryVersion.id == version_id,
                                              MemoryVersion.status == VersionStatus.FINALIZING)
                  .values(status=VersionStatus.BUILDING))
    status = finalize_if_complete(rt, version_id)
    if status is None:
        raise RecoError(f"{name} v{version} was finalized by another process meanwhile")
    return status


def delete(rt, name: str, version: int, force: bool = False, kind: str = MEMORY) -> None:
    with rt.db.session() as s:
        mem = get_memory(s, name, kind)
        v = get_version(s, name, version, kind=kind)
        if mem.active_version_id == v.id:
            if not force:
                raise RecoError(f"{name} v{version} is the active version: activate another first, or pass --force")
            mem.active_version_id = None
            rt.store.drop_alias(alias_name(name))
        collection = v.collection
        s.delete(v)
    if rt.store.exists(collection):
        rt.store.drop(collection)


def list_memories(rt, kind: str = MEMORY) -> list[dict]:
    """Every memory (or class set) by name, with a summary of each of its versions."""
    with rt.db.session() as s:
        return [{"name": mem.name, "versions": [summary(s, v, mem.active_version_id) for v in mem.versions]}
                for mem in s.scalars(select(Memory).where(Memory.kind == kind).order_by(Memory.name))]


def summary(s, v: MemoryVersion, active_id: int | None) -> dict:
    reasons: dict[str, int] = {}
    for sh in v.shards:
        for r, n in (sh.skip_reasons or {}).items():
            reasons[r] = reasons.get(r, 0) + n
    return {
        "version": v.version,
        "status": v.status,
        "active": v.id == active_id,
        "backbone": v.backbone,
        "backbone_hash": v.backbone_hash,
        "dim": v.dim,
        "source": v.source,
        "format": v.source_format,
        "collection": v.collection,
        "quantization": v.quantization,
        "on_disk": bool(v.on_disk),
        "items_stored": v.items_stored,
        "items_skipped": v.items_skipped,
        "skip_reasons": reasons,
        "shards_done": sum(sh.status == ShardStatus.DONE for sh in v.shards),
        "shards_total": len(v.shards),
        "error": v.error,
        "parent_version": v.parent_version,
        "items_forgotten": v.items_forgotten or 0,
        **({"details": v.details} if v.details else {}),
        "created_at": v.created_at.isoformat() if v.created_at else None,
        "ready_at": v.ready_at.isoformat() if v.ready_at else None,
        "activated_at": v.activated_at.isoformat() if v.activated_at else None,
    }


def fail_shard(rt, shard_id: int, error: str) -> None:
    """A shard that cannot succeed: it ends failed with its error, and so does its building version."""
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


def fail_version(rt, version_id: int, error: str, drop: bool = False) -> bool:
    """A build that stopped outside any shard's own failure (the collection could not be created, the seal ran
    out of disk): the version ends failed with the reason instead of staying `building` for ever. `drop` removes
    its half-written collection first (no reader can use it, and on a full disk that frees the space the DB
    write needs); only for a build run in this process, where no worker still writes to it. Returns whether
    this call failed it (a version already failed, ready or gone is left alone)."""
    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        if v is None or v.status not in (VersionStatus.BUILDING, VersionStatus.FINALIZING):
            return False
        collection = v.collection
    if drop:
        try:
            if rt.store.exists(collection):
                rt.store.drop(collection)
        except Exception:  # noqa: BLE001 - best effort: the failure is recorded below either way
            pass
    with rt.db.session() as s:
        return s.execute(update(MemoryVersion).where(
            MemoryVersion.id == version_id,
            MemoryVersion.status.in_((VersionStatus.BUILDING, VersionStatus.FINALIZING)))
            .values(status=VersionStatus.FAILED, error=error)).rowcount == 1


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
        collection, activate_after = v.collection, bool(v.activate_when_ready)
        storage = storage_of(v)
        name, number, kind = v.memory.name, v.version, v.memory.kind or MEMORY
        delta = v.parent_version is not None
    # one open for the checks before the seal (the embedded engine loads a whole shard on each open: seconds at 1M)
    with rt.store.hold(collection) if rt.store.exists(collection) else nullcontext():
        if delta:
            _apply_updates(rt, version_id, collection, number)
        with rt.db.session() as s:
            shards = s.scalars(select(IngestShard).where(IngestShard.version_id == version_id)).all()
            expected = sum(sh.items_stored for sh in shards)
            skipped = sum(sh.items_skipped for sh in shards)
        if expected and rt.store.count(collection) < expected:
            expected, skipped = _move_overwritten_to_duplicates(rt, version_id, collection, number, delta)
    error = None
    if expected == 0:
        error = "no item could be stored (see the skip reasons with `reco memory show`)"
    else:
        n = rt.store.seal(collection, storage)
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
        activate(rt, name, number, kind)
    return VersionStatus.FAILED if error else VersionStatus.READY


def _apply_updates(rt, version_id: int, collection: str, number: int) -> None:
    """A delta's items replace its parent's copies of the same keys (an update): delete those copies and move
    their count from the copy shard's stored to its `updated`, then record the lineage. Safe to run again."""
    from .corpus import SkipReason

    own = rt.store.keys_of_version(collection, number)
    rt.store.delete_keys(collection, own, keep_version=number)
    kept = rt.store.count(collection) - len(own)  # the parent's points still here
    with rt.db.session() as s:
        v = s.get(MemoryVersion, version_id)
        shards = list(v.shards)
        copy = next(sh for sh in shards if is_copy(sh))
        reasons = dict(copy.skip_reasons or {})
        copied = (copy.items_stored or 0) + reasons.get(SkipReason.UPDATED, 0)  # as the copy left it
        updated = copied - kept
        if updated:
            reasons[SkipReason.UPDATED] = updated
        else:
            reasons.pop(SkipReason.UPDATED, None)
        copy.items_stored, copy.items_skipped, copy.skip_reasons = kept, sum(reasons.values()), reasons
        removed = reasons.get(SkipReason.REMOVED, 0)
        v.details = {**(v.details or {}), "lineage": {
            "parent": v.parent_version, "parent_items": copied + removed, "added": len(own) - updated,
            "updated": updated, "removed": removed}}
        if copy.spec.get("takedown") is not None:  # the `--remove-keys` takedown this delta carries out
            t = s.get(Takedown, copy.spec["takedown"])
            t.points_removed, t.finished_at = removed, utcnow()


def lineage_line(v: dict) -> str | None:
    """`v3 = v2 + 1,200 − 35 (12 updated)`: what a delta version added to and removed from its parent."""
    d = (v.get("details") or {}).get("lineage")
    if not d:
        return f"v{v['version']} = v{v['parent_version']} (delta, not sealed yet)" if v.get("parent_version") else None
    return (f"v{v['version']} = v{d['parent']} + {d['added']:,} − {d['removed']:,} ({d['updated']:,} updated; "
            f"v{d['parent']} had {d['parent_items']:,})")


def _move_overwritten_to_duplicates(rt, version_id: int, collection: str, number: int,
                                    delta: bool = False) -> tuple[int, int]:
    """A key stored by two shards is one point, the earliest shard's (app/ingest.py): where a later shard wrote
    it first and was overwritten, count it as that shard's duplicate. Reads the payloads once, only when the
    store holds fewer points than the shards reported. Returns the version's (stored, skipped). In a delta only
    the delta's own points count (the copied ones keep their parent's shard numbers)."""
    owned: Counter = Counter()
    for _ids, _img, _txt, payloads in rt.store.scan(collection):
        owned.update(p.get("shard_index") for p in payloads if not delta or p.get("version") == number)
    with rt.db.session() as s:
        shards = s.scalars(select(IngestShard).where(IngestShard.version_id == version_id)).all()
        for sh in shards:
            if is_copy(sh):
                continue
            lost = (sh.items_stored or 0) - owned.get(sh.index, 0)
            if lost > 0 and None not in owned:
                sh.items_stored -= lost
                sh.items_skipped = (sh.items_skipped or 0) + lost
                reasons = dict(sh.skip_reasons or {})
                reasons["duplicate_key"] = reasons.get("duplicate_key", 0) + lost
                sh.skip_reasons = reasons
        return sum(sh.items_stored or 0 for sh in shards), sum(sh.items_skipped or 0 for sh in shards)
