"""Faults in the distributed profile, each with real processes on this machine: PostgreSQL restarted during
ingestion, Redis restarted during ingestion, a training worker killed, two builds of one name at once, a broker
message delivered twice; and the whole distributed run (two workers encoding at once, training, evaluation)
with secrets in every URL, none of which may appear in any log line or CLI output.

Redis here is the test's own redis-server (a password, an append-only file, a port of its own) and PostgreSQL the
session's private cluster (tests/services.py), so restarting either disturbs nothing else. Marked slow.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery

from app import synthetic
from tests.services import private_redis
from tests.test_distributed import pg_url, reco, shard_states, start_worker, version_status  # noqa: F401

pytestmark = pytest.mark.slow

DB_SECRET = "pg-" + uuid.uuid4().hex[:12]  # trust auth on loopback ignores it; it must still never be printed
QDRANT_SECRET = "qk-" + uuid.uuid4().hex[:12]


@pytest.fixture
def own_redis(tmp_path):
    r = private_redis(tmp_path / "redis")
    yield r
    r.stop()


@pytest.fixture
def env(tmp_path, pg_url, own_redis):  # noqa: F811
    e = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    e.update(RECO_HOME=str(tmp_path / "home"), RECO_DATABASE_URL=pg_url.replace("://postgres@",
                                                                                 f"://postgres:{DB_SECRET}@"),
             RECO_BROKER_URL=own_redis.url, RECO_RESULT_BACKEND=own_redis.url.replace("/0", "/1"),
             RECO_QDRANT_API_KEY=QDRANT_SECRET, RECO_VISIBILITY_TIMEOUT="4", RECO_OFFLINE="1",
             HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    reco(e, "db", "upgrade")
    return e


def wait_ready(env, name, version=1, timeout=300, logs=()):
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = version_status(env, name, version)["status"]
        except AssertionError:  # the database may be restarting
            st = None
        if st not in (None, "building", "finalizing"):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} v{version} still {st}\n" + "\n".join(
                Path(p).read_text()[-3000:] for p in logs))
        time.sleep(0.5)


def wait_for_shards(env, predicate, timeout=240):
    deadline = time.monotonic() + timeout
    while True:
        states = shard_states(env)
        if predicate(states):
            return states
        assert time.monotonic() < deadline, f"shards never reached the state: {states}"
        time.sleep(0.05)


def shard_spans(env):
    """(started, finished) of every shard, from the metadata database."""
    from sqlalchemy import text

    from app.db import Database

    db = Database(env["RECO_DATABASE_URL"], check=False)
    try:
        with db.engine.connect() as c:
            return [tuple(r) for r in c.execute(text("SELECT started_at, finished_at FROM ingest_shards"))]
    finally:
        db.dispose()


def assert_clean(env, name, version, items):
    v = json.loads(reco(env, "memory", "verify", name, "--version", version, "--json").stdout)
    assert v["ok"] and v["store_count"] == items, v


def stop(*procs):
    for p in procs:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def test_postgres_restart_during_ingestion(env, private_pg, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=6, per_shard=40)[0].parent
    w = start_worker(env, tmp_path, "pgw")
    try:
        reco(env, "memory", "build", "pgr", src, "--backbone", tiny_config, "--no-wait")
        wait_for_shards(env, lambda st: any(s == "running" for s, _ in st))
        private_pg.stop()  # the session's own cluster: a fast shutdown and a start
        private_pg.start()
        assert wait_ready(env, "pgr", logs=[tmp_path / "pgw.log"]) == "ready"
        assert_clean(env, "pgr", 1, 240)
    finally:
        stop(w)


def test_redis_restart_during_ingestion(env, own_redis, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=8, per_shard=40)[0].parent
    w = start_worker(env, tmp_path, "rdw")
    try:
        reco(env, "memory", "build", "rdr", src, "--backbone", tiny_config, "--no-wait")
        wait_for_shards(env, lambda st: any(s == "running" for s, _ in st))
        own_redis.restart()
        assert wait_ready(env, "rdr", logs=[tmp_path / "rdw.log"]) == "ready"
        assert_clean(env, "rdr", 1, 320)
        assert all(s == "done" for s, _ in shard_states(env))
    finally:
        stop(w)


def test_training_worker_killed_resumes_on_another(env, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=2, per_shard=64, jitter=0.3)[0].parent
    first = start_worker(env, tmp_path, "t1")
    second = None
    try:
        reco(env, "memory", "build", "tk", src, "--backbone", tiny_config, "--activate", "--timeout", "240")
        reco(env, "train", "tkm", "--pairs", "tk", "--memory", "tk", "-k", "5", "--epochs", "150",
             "--batch-size", "16", "--checkpoint-every", "20", "--no-wait")
        deadline = time.monotonic() + 240
        while json.loads(reco(env, "model", "show", "tkm", "--json").stdout)["step"] < 40:
            assert time.monotonic() < deadline, (tmp_path / "t1.log").read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = start_worker(env, tmp_path, "t2")
        deadline = time.monotonic() + 600
        while (shown := json.loads(reco(env, "model", "show", "tkm", "--json").stdout))["status"] == "training":
            assert time.monotonic() < deadline, (tmp_path / "t2.log").read_text()[-3000:]
            time.sleep(1)
        assert shown["status"] == "ready", shown
        assert shown["metrics"]["resumed_from"] >= 40  # it went on from the checkpoint, not from scratch
        assert shown["step"] == shown["metrics"]["steps"]
        assert_clean(env, "tk", 1, 128)
    finally:
        stop(first, second)


def test_two_builds_of_one_name_at_once(env, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=2, per_shard=20)[0].parent
    cmd = [sys.executable, "-m", "app", "memory", "build", "twin", str(src), "--backbone", tiny_config,
           "--no-wait"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    w = start_worker(env, tmp_path, "tw")
    try:
        assert wait_ready(env, "twin", 1, logs=[tmp_path / "tw.log"]) == "ready"
        assert wait_ready(env, "twin", 2, logs=[tmp_path / "tw.log"]) == "ready"
        listed = json.loads(reco(env, "memory", "list", "--json").stdout)
        versions = [v for m in listed if m["name"] == "twin" for v in m["versions"]]
        assert sorted(v["version"] for v in versions) == [1, 2]
        assert len({v["collection"] for v in versions}) == 2
        for version in (1, 2):
            assert_clean(env, "twin", version, 40)
    finally:
        stop(w)


def test_distributed_run_two_workers_duplicates_and_no_secret_printed(env, own_redis, tmp_path, tiny_config):
    """Two workers encode shards at once (sharing the embedded shard through its file lock), every shard message
    is delivered twice, then a model is trained through a worker and evaluated; nothing secret is ever printed."""
    n_shards, per_shard = 8, 40
    src = synthetic.write_wds(tmp_path / "wds", n_shards=n_shards, per_shard=per_shard, jitter=0.3)[0].parent
    outputs = []

    def cli(*args, **kw):
        r = reco(env, *args, **kw)
        outputs.append(r.stdout + r.stderr)
        return r

    cli("info")
    cli("memory", "build", "e2e", src, "--backbone", tiny_config, "--activate", "--no-wait")
    shard_ids = [json.loads(cli("memory", "show", "e2e", "--json").stdout)["shards"][i]["id"]
                 for i in range(n_shards)]
    sender = Celery(broker=own_redis.url)
    for sid in shard_ids:  # a second delivery of every shard message
        sender.send_task("reco.ingest_shard", args=[sid], queue="ingest")
    workers = [start_worker(env, tmp_path, f"e{i}") for i in range(2)]
    try:
        assert wait_ready(env, "e2e", logs=[tmp_path / "e0.log", tmp_path / "e1.log"]) == "ready"
        assert_clean(env, "e2e", 1, n_shards * per_shard)
        logs = [(tmp_path / f"e{i}.log").read_text() for i in range(2)]
        assert all("reco.ingest_shard" in log and "succeeded" in log for log in logs), "both workers took shards"
        spans = shard_spans(env)
        assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans) for b0, b1 in spans[i + 1:]), \
            f"no two shards were in flight at once: {spans}"
        cli("train", "e2e-model", "--pairs", "e2e", "--memory", "e2e", "-k", "5", "--epochs", "20",
            "--batch-size", "32", "--timeout", "300")
        cli("eval", "classification", "--model", "e2e-model", "-k", "1,5",
            "--dataset", f"imagefolder:{synthetic.write_imagefolder(tmp_path / 'eval', per_class=2) / 'images'}",
            "--classnames", str(tmp_path / "eval" / "classnames.txt"))
        cli("status", "--json")
        cli("status")
        cli("memory", "list")
        cli("model", "list", "--json")
        cli("eval", "list")
    finally:
        stop(*workers)
    secrets = [DB_SECRET, QDRANT_SECRET, own_redis.password]
    texts = outputs + [(tmp_path / f"e{i}.log").read_text() for i in range(2)]
    for secret in secrets:
        leaks = [t for t in texts if secret in t]
        assert not leaks, f"secret printed: {leaks[0][:2000]}"
