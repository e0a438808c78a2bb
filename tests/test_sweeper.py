"""Leases and the sweeper's rules on the embedded profile (app/leases.py, app/build.py); the same code against
real workers, a restarted broker and a stopped database is in tests/test_leases.py."""

from datetime import timedelta

import pytest
from sqlalchemy import select

from app.build import resume, start_build, sweep
from app.db.models import IngestShard, MemoryVersion, ShardStatus, VersionStatus, utcnow
from app.errors import RecoError
from app.ingest import run_shard
from app.leases import Heartbeat, claim, release


@pytest.fixture
def version(rt, wds_corpus, tiny_config):
    v = start_build(rt, "sw", str(wds_corpus), backbone=tiny_config)
    with rt.db.session() as s:
        ids = s.scalars(select(IngestShard.id).where(IngestShard.version_id == v.id).order_by(IngestShard.index)).all()
    return v.id, ids


def _set(rt, sid, **values):
    with rt.db.session() as s:
        sh = s.get(IngestShard, sid)
        for k, val in values.items():
            setattr(sh, k, val)


def _get(rt, sid) -> IngestShard:
    with rt.db.session() as s:
        return s.get(IngestShard, sid)


def test_a_live_lease_is_exclusive_and_an_expired_one_is_taken_over(rt, version):
    _, (sid, *_) = version
    assert claim(rt, sid, "a@h:1")
    assert not claim(rt, sid, "b@h:2")  # a holds it
    _set(rt, sid, heartbeat_at=utcnow() - timedelta(seconds=rt.settings.lease_s + 1))
    assert claim(rt, sid, "b@h:2")  # a's lease expired
    sh = _get(rt, sid)
    assert sh.worker == "b@h:2" and sh.attempts == 2
    release(rt, sid, "a@h:1")  # a stale holder cannot give back what it lost
    assert _get(rt, sid).status == ShardStatus.RUNNING
    release(rt, sid, "b@h:2")
    assert _get(rt, sid).status == ShardStatus.PENDING and _get(rt, sid).worker is None


def test_the_heartbeat_renews_the_lease_while_the_shard_is_worked_on(rt, version, monkeypatch):
    import dataclasses
    import time

    _, (sid, *_) = version
    monkeypatch.setattr(rt, "settings", dataclasses.replace(rt.settings, lease_s=1))
    assert claim(rt, sid, "a@h:1")
    first = _get(rt, sid).heartbeat_at
    with Heartbeat(rt, sid, "a@h:1"):
        time.sleep(0.9)
    assert _get(rt, sid).heartbeat_at > first


def test_sweep_requeues_lost_work_and_leaves_live_work_alone(rt, version):
    vid, (live, stale, pending) = version
    old = utcnow() - timedelta(seconds=rt.settings.lease_s + 5)
    _set(rt, live, status=ShardStatus.RUNNING, worker="a@h:1", heartbeat_at=utcnow(), attempts=1)
    _set(rt, stale, status=ShardStatus.RUNNING, worker="b@h:2", heartbeat_at=old, attempts=1)
    _set(rt, pending, queued_at=utcnow())  # just queued: its message is on its way
    sent = []
    assert sweep(rt, sent.append, queue_empty=True) == {"requeued": 1, "failed": 0, "finalized": 0}
    assert sent == [stale] and _get(rt, stale).status == ShardStatus.PENDING and _get(rt, stale).worker is None
    assert _get(rt, live).status == ShardStatus.RUNNING
    # a pending shard queued a lease period ago while the queue is empty: its message was lost
    _set(rt, pending, queued_at=old)
    sent.clear()
    assert sweep(rt, sent.append, queue_empty=False)["requeued"] == 0  # messages wait: maybe its own
    assert sweep(rt, sent.append, queue_empty=True)["requeued"] == 1 and sent == [pending]
    sent.clear()
    assert sweep(rt, sent.append, queue_empty=True)["requeued"] == 0  # both just re-queued: not again at once
    _set(rt, pending, queued_at=utcnow() - timedelta(seconds=rt.settings.visibility_timeout + 1))
    assert sweep(rt, sent.append, queue_empty=None)["requeued"] == 1  # the broker can't say: age decides
    sent.clear()
    assert sweep(rt, sent.append, queue_empty=False, force=True)["requeued"] == 2  # an operator's resume
    assert set(sent) == {pending, stale}


def test_a_shard_lost_too_often_fails_with_its_version(rt, version):
    vid, (sid, *_) = version
    _set(rt, sid, status=ShardStatus.RUNNING, worker="a@h:1", attempts=rt.settings.max_attempts,
         heartbeat_at=utcnow() - timedelta(seconds=rt.settings.lease_s + 1), error="OSError: disk full")
    sent = []
    assert sweep(rt, sent.append, queue_empty=True)["failed"] == 1 and sent == []
    sh = _get(rt, sid)
    assert sh.status == ShardStatus.FAILED and "taken 5 times" in sh.error and "disk full" in sh.error
    with rt.db.session() as s:
        v = s.get(MemoryVersion, vid)
        assert v.status == VersionStatus.FAILED and "taken 5 times" in v.error


def test_resume_finishes_a_failed_version_and_sweep_finalizes_an_orphan(rt, version):
    vid, ids = version
    for sid in ids[:2]:
        run_shard(rt, sid, finalize=False)
    _set(rt, ids[2], status=ShardStatus.FAILED, attempts=5, error="lost")
    with rt.db.session() as s:
        s.get(MemoryVersion, vid).status = VersionStatus.FAILED
    assert resume(rt, "sw", 1)["ran_in_process"]  # embedded: the unfinished shard runs here
    with rt.db.session() as s:
        v = s.get(MemoryVersion, vid)
        assert v.status == VersionStatus.READY and v.items_stored == 24
    assert rt.store.count(v.collection) == 24
    with pytest.raises(RecoError, match="only a building or failed version"):
        resume(rt, "sw", 1)


def test_sweep_seals_a_version_whose_last_shard_finished_but_never_finalized(rt, version):
    vid, ids = version
    for sid in ids:
        run_shard(rt, sid, finalize=False)  # a finaliser that died before the flip
    assert sweep(rt, [].append, queue_empty=True)["finalized"] == 1
    with rt.db.session() as s:
        assert s.get(MemoryVersion, vid).status == VersionStatus.READY


def test_queries_refuse_a_version_whose_store_lost_points(rt, cli_run, wds_corpus, tiny_config):
    from app.build import build_in_process
    from app.query import query_memory

    v = build_in_process(rt, "dmg", str(wds_corpus), backbone=tiny_config, activate=True)
    assert len(query_memory(rt, "dmg", text="a red circle", k=3)) == 3
    with rt.db.session() as s:  # the store now holds fewer points than the version recorded
        s.get(MemoryVersion, v.id).items_stored = 30
    with pytest.raises(RecoError, match="damaged: the vector store holds 24 of its 30 points"):
        query_memory(rt, "dmg", text="a red circle", k=3)
    r = cli_run("memory", "query", "dmg", "--text", "a red circle", ok=False)
    assert r.exit_code == 1 and "damaged" in r.output and "Traceback" not in r.output


def test_resume_takes_over_a_shard_of_a_crashed_in_process_build(rt, cli_run, version):
    import subprocess
    import sys

    from app.leases import holder_name

    vid, (sid, *rest) = version
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = holder_name().rpartition(":")[0] + ":" + dead.stdout.strip()  # this host, a process that has exited
    _set(rt, sid, status=ShardStatus.RUNNING, worker=gone, heartbeat_at=utcnow(), attempts=1)
    _set(rt, rest[0], status=ShardStatus.RUNNING, worker=holder_name(), heartbeat_at=utcnow(), attempts=1)
    r = cli_run("memory", "resume", "sw", "1", ok=False)  # this process's own lease is live: left alone
    assert r.exit_code == 1 and "sw v1 building: 2/3 shards done" in r.output and "lease" in r.output
    assert _get(rt, sid).status == ShardStatus.DONE
    _set(rt, rest[0], heartbeat_at=utcnow() - timedelta(seconds=rt.settings.lease_s + 1))
    assert "sw v1 ready" in cli_run("memory", "resume", "sw").output
