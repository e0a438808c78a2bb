"""The Celery task wrapper: delivery guarantees in its configuration, retries on transient failures."""

from sqlalchemy import select

from app.build import start_build
from app.db.models import IngestShard, MemoryVersion
from app.errors import TransientError
from workers import tasks
from workers.celery_app import app


def test_delivery_settings():
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.task_routes["reco.ingest_shard"]["queue"] == "ingest"
    assert tasks.ingest_shard.acks_late
    assert TransientError in tasks.ingest_shard.autoretry_for


def test_transient_store_error_is_retried_and_the_shard_finishes(rt, monkeypatch, wds_corpus, tiny_config):
    v = start_build(rt, "retry", str(wds_corpus), backbone=tiny_config)
    with rt.db.session() as s:
        shard_ids = s.scalars(select(IngestShard.id).where(IngestShard.version_id == v.id)).all()
    monkeypatch.setattr(tasks, "_runtime", rt)
    real_upsert = rt.store.upsert
    failures = {"left": 2}

    def flaky_upsert(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise TransientError("Qdrant did not answer")
        return real_upsert(*args, **kwargs)

    monkeypatch.setattr(rt.store, "upsert", flaky_upsert)
    monkeypatch.setattr(tasks.ingest_shard, "retry_backoff", False)  # eager retries run at once
    for sid in shard_ids:
        result = tasks.ingest_shard.apply(args=(sid,))
        assert result.successful(), result.traceback
    with rt.db.session() as s:
        assert s.get(IngestShard, shard_ids[0]).attempts == 3
        assert s.get(MemoryVersion, v.id).status == "ready"
    assert rt.store.count(v.collection) == 24
