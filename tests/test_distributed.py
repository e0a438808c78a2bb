"""The distributed profile on this machine: PostgreSQL metadata, Celery workers on Redis, real worker processes.

Marked slow. PostgreSQL and Redis are private instances the test session starts (tests/services.py), never the
machine's own. Vectors stay in the embedded engine (there is no Qdrant server binary here), shared by worker
processes through the per-version file lock.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import create_engine, text

from app import synthetic
from app.db import Database

pytestmark = pytest.mark.slow

@pytest.fixture
def pg_url(private_pg):
    """A fresh database in the session's private PostgreSQL cluster."""
    name = f"reco_test_{uuid.uuid4().hex[:8]}"
    private_pg.create_db(name)
    yield private_pg.url(name)
    admin = create_engine(private_pg.url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except Exception:  # noqa: BLE001 - a test that stopped the cluster; it is removed with the session anyway
        pass
    admin.dispose()


@pytest.fixture
def redis_url(private_redis_server):
    import redis

    url = private_redis_server.url.rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def dist_env(tmp_path, pg_url, redis_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    env.update(RECO_HOME=str(tmp_path / "home"), RECO_DATABASE_URL=pg_url, RECO_BROKER_URL=redis_url,
               RECO_VISIBILITY_TIMEOUT="4", RECO_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def reco(env, *args, check=True, timeout=300):
    r = subprocess.run([sys.executable, "-m", "app", *map(str, args)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"reco {' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def start_worker(env, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "app", "worker", "-Q", "ingest,train", "-n", f"{name}@%h"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def shard_states(env):
    db = Database(env["RECO_DATABASE_URL"], check=False)
    try:
        with db.engine.connect() as c:
            return [tuple(r) for r in c.execute(text(
                "SELECT s.status, s.attempts FROM ingest_shards s ORDER BY s.index"))]
    finally:
        db.dispose()


def version_status(env, name, version=1):
    r = reco(env, "memory", "show", name, "--version", version, "--json")
    return json.loads(r.stdout)


def test_schema_is_refused_until_upgraded_then_upgrade_is_idempotent(dist_env):
    r = reco(dist_env, "memory", "list", check=False)
    assert r.returncode == 1 and "run `reco db upgrade`" in r.stderr
    assert "->" in reco(dist_env, "db", "upgrade").stdout
    assert "already at" in reco(dist_env, "db", "upgrade").stdout
    assert reco(dist_env, "memory", "list", "--json").stdout.strip() == "[]"


def test_worker_build_on_postgres_and_redis(dist_env, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=3, per_shard=10)[0].parent
    reco(dist_env, "db", "upgrade")
    w = start_worker(dist_env, tmp_path, "w1")
    try:
        r = reco(dist_env, "memory", "build", "dist", src, "--backbone", tiny_config, "--activate", "--timeout", "240")
        assert "dist v1 ready (active): 30 items stored" in r.stdout
        assert reco(dist_env, "memory", "verify", "dist").returncode == 0
        hits = json.loads(reco(dist_env, "memory", "query", "dist", "--text", "a blue square", "--json").stdout)
        assert hits[0]["caption"] == "a blue square"

        # a delta on the workers: the parent copied here, the new shard encoded there; then a takedown everywhere
        more = synthetic.write_wds(tmp_path / "more", n_shards=1, per_shard=5, seed=7, prefix="more-")[0].parent
        (tmp_path / "rm.txt").write_text("00000001\n00000012\n")
        r = reco(dist_env, "memory", "build", "dist", more, "--from", "1", "--remove-keys", tmp_path / "rm.txt",
                 "--timeout", "240")
        assert "dist v2 ready: 33 items stored" in r.stdout and "v2 = v1 + 5 − 2 (0 updated; v1 had 30)" in r.stdout
        (tmp_path / "gone.txt").write_text("00000003\n")
        r = reco(dist_env, "memory", "forget", "dist", "--keys", tmp_path / "gone.txt", "--all-versions")
        assert "v1: 1, v2: 1" in r.stdout
        (tmp_path / "one.txt").write_text("00000004\n")
        r = reco(dist_env, "memory", "forget", "dist", "--keys", tmp_path / "one.txt")  # a delta with nothing to add
        assert "takedown #3 (version) done: 1 keys, -> v3" in r.stdout
        for v in (1, 2, 3):
            assert reco(dist_env, "memory", "verify", "dist", "--version", v).returncode == 0
        assert version_status(dist_env, "dist", 2)["items_stored"] == 32
        assert version_status(dist_env, "dist", 3)["items_stored"] == 28
    finally:
        w.kill()
        w.wait()


def test_worker_killed_mid_ingestion_loses_and_duplicates_nothing(dist_env, tmp_path, tiny_config):
    n_shards, per_shard = 8, 40
    src = synthetic.write_wds(tmp_path / "wds", n_shards=n_shards, per_shard=per_shard)[0].parent
    reco(dist_env, "db", "upgrade")
    first = start_worker(dist_env, tmp_path, "first")
    second = None
    try:
        reco(dist_env, "memory", "build", "kill", src, "--backbone", tiny_config, "--no-wait")
        deadline = time.monotonic() + 240
        while True:  # kill while one shard is done and another is in flight
            states = shard_states(dist_env)
            if any(s == "done" for s, _ in states) and any(s == "running" for s, _ in states):
                break
            assert time.monotonic() < deadline, f"worker never got going: {states}"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_in_flight = [i for i, (s, _) in enumerate(shard_states(dist_env)) if s == "running"]
        assert killed_in_flight

        second = start_worker(dist_env, tmp_path, "second")
        deadline = time.monotonic() + 300
        while version_status(dist_env, "kill")["status"] in ("building", "finalizing"):
            assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()[-3000:]
            time.sleep(1)
        shown = version_status(dist_env, "kill")
        assert shown["status"] == "ready", shown
        assert shown["items_stored"] == n_shards * per_shard
        states = shard_states(dist_env)
        assert all(s == "done" for s, _ in states)
        assert all(states[i][1] >= 2 for i in killed_in_flight)  # the killed shard really ran again
        verified = json.loads(reco(dist_env, "memory", "verify", "kill", "--json").stdout)
        assert verified["ok"] and verified["store_count"] == n_shards * per_shard
    finally:
        for w in (first, second):
            if w is not None and w.poll() is None:
                w.kill()
                w.wait()


def test_training_through_a_worker_on_queue_train(dist_env, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=2, per_shard=32, jitter=0.3)[0].parent
    reco(dist_env, "db", "upgrade")
    w = start_worker(dist_env, tmp_path, "trainer")
    try:
        reco(dist_env, "memory", "build", "tm", src, "--backbone", tiny_config, "--activate", "--timeout", "240")
        r = reco(dist_env, "train", "tmodel", "--pairs", "tm", "--memory", "tm", "-k", "5", "--epochs", "3",
                 "--batch-size", "16", "--timeout", "240")
        assert "tmodel ready" in r.stdout
        shown = json.loads(reco(dist_env, "model", "show", "tmodel", "--json").stdout)
        assert shown["status"] == "ready" and shown["step"] > 0
        log = (tmp_path / "trainer.log").read_text()
        assert "reco.train" in log and "succeeded" in log
    finally:
        w.kill()
        w.wait()


def test_status_reports_workers_queues_and_builds(dist_env, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=3, per_shard=10)[0].parent
    reco(dist_env, "db", "upgrade")
    reco(dist_env, "memory", "build", "st", src, "--backbone", tiny_config, "--no-wait")
    st = json.loads(reco(dist_env, "status", "--json").stdout)
    assert st["profile"] == "distributed" and st["workers"] == []
    assert st["queues"]["ingest"] == 3 and st["queues"]["train"] == 0  # nobody consumes yet
    (b,) = st["building_versions"]
    assert (b["memory"], b["version"], b["status"], b["shards"]["pending"]) == ("st", 1, "building", 3)
    text_out = reco(dist_env, "status").stdout
    assert "workers: none answered" in text_out and "st v1 building: 0/3 shards done" in text_out

    w = start_worker(dist_env, tmp_path, "stw")
    try:
        deadline = time.monotonic() + 240
        while version_status(dist_env, "st")["status"] != "ready":
            assert time.monotonic() < deadline, (tmp_path / "stw.log").read_text()[-3000:]
            time.sleep(0.5)
        st = json.loads(reco(dist_env, "status", "--json", "--timeout", "3").stdout)
        assert any(name.startswith("stw@") for name in st["workers"])
        assert st["queues"]["ingest"] == 0 and st["building_versions"] == [] and st["failed_jobs"] == []
    finally:
        w.kill()
        w.wait()
