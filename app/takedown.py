"""Takedowns: keys that must leave a memory (a licence withdrawn, a privacy request; `reco memory forget`).

Two scopes. `version`: a delta version without the keys is built (app/build.py), to activate as usual; the versions
already built keep them. `all-versions`: the keys are also deleted in place from every existing version (the one
write a sealed version takes), the training caches built from those versions are dropped, and every later build,
copy and export of the memory leaves them out.

An all-versions takedown is a row in the metadata DB before the store is touched, and records per version the points
it matched before deleting them, so a failure part-way leaves a `failed` takedown that `verify` reports for every
version of the memory and `reco memory forget NAME --resume` finishes, with exact counts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from sqlalchemy import select

from .db.models import Memory, MemoryVersion, Takedown, TakedownKey, TakedownStatus, VersionStatus, utcnow
from .errors import RecoError
from .memory import ALL_VERSIONS, get_memory, removed_keys, unfinished_takedowns
from .textfile import lines

MAX_KEY_CHARS = 512  # the metadata DB's column


def read_keys(path: str | Path) -> list[str]:
    """One key per line (surrounding blanks and empty lines ignored, repeats once), as `reco memory query --json`
    and exports print them."""
    p = Path(path)
    if not p.is_file():
        raise RecoError(f"{p} is not a file: give a text file with one item key per line")
    keys = {}
    for number, text in lines(p):
        key = text.strip()
        if len(key) > MAX_KEY_CHARS:
            raise RecoError(f"{p}:{number}: a key of {len(key)} characters; keys are at most {MAX_KEY_CHARS}")
        if key:
            keys[key] = None
    if not keys:
        raise RecoError(f"{p} holds no key: one item key per line")
    return list(keys)


def keys_digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def record(rt, name: str, keys: list[str], scope: str, reason: str = "") -> int:
    """Write the takedown and its keys; returns its id."""
    with rt.db.session() as s:
        mem = get_memory(s, name)
        t = Takedown(memory_id=mem.id, scope=scope, reason=reason, keys_count=len(keys), keys_sha256=keys_digest(keys),
                     status=TakedownStatus.RUNNING if scope == ALL_VERSIONS else TakedownStatus.DONE, progress={},
                     points_removed=0, caches_dropped=0)
        s.add(t)
        s.flush()
        s.add_all(TakedownKey(takedown_id=t.id, key=k) for k in keys)
        return t.id


def built(rt, takedown_id: int, version: int) -> None:
    """A `version` takedown's delta version exists: record its number."""
    with rt.db.session() as s:
        s.get(Takedown, takedown_id).new_version = version


def forget_everywhere(rt, name: str, keys: list[str], reason: str = "") -> dict:
    """Delete `keys` in place from every version of NAME (scope all-versions). Refused while a version builds:
    its shards would not know the keys yet."""
    with rt.db.session() as s:
        mem = get_memory(s, name)
        building = [v.version for v in mem.versions if v.status in (VersionStatus.BUILDING, VersionStatus.FINALIZING)]
        pending = [t.id for t in unfinished_takedowns(s, mem.id)]
    if building:
        raise RecoError(f"{name} v{building[0]} is still building: wait for it (or delete it), then forget")
    if pending:
        raise RecoError(f"takedown #{pending[0]} of {name} is not finished: run `reco memory forget {name} --resume` "
                        "first")
    return run(rt, record(rt, name, keys, ALL_VERSIONS, reason))


def resume(rt, name: str) -> list[dict]:
    """Finish every unfinished takedown of NAME, oldest first."""
    with rt.db.session() as s:
        ids = [t.id for t in unfinished_takedowns(s, get_memory(s, name).id)]
    if not ids:
        raise RecoError(f"{name} has no unfinished takedown (`reco memory show {name}` lists them)")
    return [run(rt, i) for i in ids]


def run(rt, takedown_id: int) -> dict:
    """Delete the takedown's keys from every version that has a collection; safe to run again after a failure."""
    from . import device_search
    from .caches import drop_built_from

    with rt.db.session() as s:
        t = s.get(Takedown, takedown_id)
        name, progress = s.get(Memory, t.memory_id).name, dict(t.progress or {})
        versions = [(v.id, v.version, v.collection) for v in
                    s.scalars(select(MemoryVersion).where(MemoryVersion.memory_id == t.memory_id)
                              .order_by(MemoryVersion.version))]
        keys = sorted(removed_keys(s, takedown_id))
        t.status, t.error = TakedownStatus.RUNNING, None
    try:
        for version_id, number, collection in versions:
            state = progress.get(str(number))
            if state and state["done"]:
                continue
            if not rt.store.exists(collection):
                _progress(rt, takedown_id, number, {"matched": 0, "done": True})
                continue
            if state is None:  # counted before any delete, so a rerun after a crash applies the same number
                state = {"matched": rt.store.count_keys(collection, keys), "done": False}
                _progress(rt, takedown_id, number, state)
            if state["matched"]:
                rt.store.delete_keys(collection, keys)
                device_search.drop(rt.store, collection)
            with rt.db.session() as s:
                v = s.get(MemoryVersion, version_id)
                v.items_forgotten = (v.items_forgotten or 0) + state["matched"]
                v.items_stored = (v.items_stored or 0) - state["matched"]
                t = s.get(Takedown, takedown_id)
                t.progress = {**(t.progress or {}), str(number): {**state, "done": True}}
                t.points_removed = (t.points_removed or 0) + state["matched"]
    except Exception as exc:
        reason = str(exc) if isinstance(exc, RecoError) else f"{type(exc).__name__}: {exc}"
        with rt.db.session() as s:
            t = s.get(Takedown, takedown_id)
            t.status, t.error = TakedownStatus.FAILED, reason
            done = sum(bool(p.get("done")) for p in (t.progress or {}).values())
        raise RecoError(f"takedown #{takedown_id} of {name} stopped after {done} of {len(versions)} versions: "
                        f"{reason}. Nothing is hidden: `reco memory verify` reports it on every version; fix the "
                        f"cause and run `reco memory forget {name} --resume`") from exc
    with rt.db.session() as s:
        t = s.get(Takedown, takedown_id)
        changed = {str(n) for n, p in (t.progress or {}).items() if p["matched"]}  # in this run or an earlier one
        dropped = drop_built_from(rt.settings.home, [c for _i, n, c in versions if str(n) in changed]) if changed else 0
        t.status, t.finished_at, t.caches_dropped = TakedownStatus.DONE, utcnow(), (t.caches_dropped or 0) + dropped
        return describe(t)


def _progress(rt, takedown_id: int, number: int, state: dict) -> None:
    with rt.db.session() as s:
        t = s.get(Takedown, takedown_id)
        t.progress = {**(t.progress or {}), str(number): state}


def describe(t: Takedown) -> dict:
    return {"id": t.id, "scope": t.scope, "reason": t.reason, "keys": t.keys_count, "keys_sha256": t.keys_sha256,
            "status": t.status, "points_removed": t.points_removed, "new_version": t.new_version,
            "versions": {int(n): p["matched"] for n, p in sorted((t.progress or {}).items(), key=lambda x: int(x[0]))},
            "caches_dropped": t.caches_dropped, "error": t.error,
            "created_at": t.created_at.isoformat() if t.created_at else None,
            "finished_at": t.finished_at.isoformat() if t.finished_at else None}


def takedowns(rt, name: str) -> list[dict]:
    """Every takedown of NAME, oldest first (`reco memory show`)."""
    with rt.db.session() as s:
        mem = get_memory(s, name)
        return [describe(t) for t in s.scalars(select(Takedown).where(Takedown.memory_id == mem.id)
                                                .order_by(Takedown.id))]

