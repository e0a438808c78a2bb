"""Builds always finish or fail loudly: shard leases, the sweeper, honest status (app/leases.py, app/build.py).

Each test runs real `reco worker` processes on a PostgreSQL cluster and a redis-server of its own (tests/services.py:
own data directory, free port, removed afterwards), injects one fault, and ends with `verify` clean and every item
stored exactly once. Marked slow.
"""

import json
import os
import signal
import time
import uuid

import pytest

from app import synthetic
from app.runtime import Runtime
from app.settings import Settings
from app.status import job_status
from tests.services import private_postgres, private_redis
from tests.test_distributed import reco, start_worker
from tests.test_faults import assert_clean, stop, wait_ready

pytestmark = pytest.mark.slow

LEASE_S = 8
PG_SECRET = "pq-" + uuid.uuid4().hex[:10]


@pytest.fixture
def own_pg():
    pg = private_postgres()  # its own: these tests stop it
    pg.create_db("reco")
    yield pg
    pg.remove()


@pytest.fixture
def redis_aof(tmp_path):
    r = private_redis(tmp_path / "redis", persistent=True)
    yield r
    r.stop()


@pytest.fixture
def redis_volatile(tmp_path):
    r = private_redis(tmp_path / "redis", persistent=False)
    yield r
    r.stop()


def _env(tmp_path, pg, redis, **extra) -> dict:
    # the password travels as libpq's ?password= (trust auth ignores it): it must never be printed
    e = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    e.update(RECO_HOME=str(tmp_path / "home"), RECO_DATABASE_URL=pg.url("reco") + f"?password={PG_SECRET}",
             RECO_BROKER_URL=redis.url, RECO_LEASE_S=str(LEASE_S), RECO_VISIBILITY_TIMEOUT="3600",
             RECO_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    reco(e, "db", "upgrade")
    return e


def _shards(env) -> list[dict]:
    return json.loads(reco(env, "memory", "show", env["_name"], "--version", "1", "--json").stdout)["shards"]


def _poll(what, predicate, timeout: float, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if predicate(got):
            return got
        assert time.monotonic() < deadline, f"never reached: {got}"
        time.sleep(every)


def _runtime(env) -> Runtime:
    return Runtime(Settings.from_env({k: v for k, v in env.items() if k.startswith("RECO_")}))


def _jobs(rt) -> dict:
    return {j["shard"]: j for j in job_status(rt)["running_jobs"] if j["kind"] == "ingest"}


def _workers_up(rt, n: int) -> None:
    from app.leases import live_workers

    _poll(lambda: live_workers(rt), lambda ws: len(ws) >= n, timeout=120, every=0.2)


def _running(rt, prefix: str = "") -> list[dict]:
    return [j for j in _jobs(rt).values() if j["state"] == "running" and (j["worker"] or "").startswith(prefix)]


def test_worker_killed_mid_shard_with_an_hour_visibility_timeout(tmp_path, own_pg, redis_aof, tiny_config):
    """Without leases the killed worker's shard waited for the broker's redelivery after an hour; now the other
    worker's sweeper sends it again and the version is ready within two lease periods of the kill."""
    env = {**_env(tmp_path, own_pg, redis_aof), "_name": "kill"}
    src = synthetic.write_wds(tmp_path / "wds", n_shards=1, per_shard=600)[0].parent
    workers = {name: start_worker(env, tmp_path, name) for name in ("ka", "kb")}
    rt = _runtime(env)
    try:
        _workers_up(rt, 2)
        reco(env, "memory", "build", "kill", src, "--backbone", tiny_config, "--no-wait")
        (job,) = _poll(lambda: _running(rt), bool, timeout=120, every=0.02)
        holder = job["worker"].split("@")[0]
        workers[holder].send_signal(signal.SIGKILL)
        workers[holder].wait()
        killed = time.monotonic()
        (other,) = set(workers) - {holder}
        # the lease, not the ingestion speed, is what is timed: the other worker holds the shard within two periods
        _poll(lambda: _running(rt, other), bool, timeout=120, every=0.05)
        took = time.monotonic() - killed
        assert took <= 2 * LEASE_S, f"taken again {took:.1f} s after the kill (lease {LEASE_S} s)"
        assert wait_ready(env, "kill", logs=[tmp_path / f"{other}.log"], timeout=120) == "ready"
        assert_clean(env, "kill", 1, 600)
        (shard,) = _shards(env)
        assert shard["state"] == "done" and shard["attempts"] == 2  # taken again after the kill
        assert "re-queued" in (tmp_path / f"{other}.log").read_text()
    finally:
        rt.close()
        stop(*workers.values())


def test_status_shows_a_stale_shard_and_resume_finishes_the_build(tmp_path, own_pg, redis_aof, tiny_config):
    env = {**_env(tmp_path, own_pg, redis_aof), "_name": "stale"}
    src = synthetic.write_wds(tmp_path / "wds", n_shards=3, per_shard=600)[0].parent
    other = synthetic.write_wds(tmp_path / "other", n_shards=1, per_shard=8)[0].parent
    w = start_worker(env, tmp_path, "sa")
    rt = _runtime(env)
    second = None
    try:
        _workers_up(rt, 1)
        reco(env, "memory", "build", "stale", src, "--backbone", tiny_config, "--no-wait")
        _poll(lambda: _running(rt), bool, timeout=120, every=0.02)
        # the only worker is busy with a shard (a solo pool answers no ping): it is alive all the same
        r = reco(env, "memory", "build", "other", other, "--backbone", tiny_config, "--no-wait")
        assert "no worker is alive" not in r.stderr, r.stderr
        _poll(lambda: _running(rt), bool, timeout=120, every=0.02)
        w.send_signal(signal.SIGKILL)
        w.wait()
        killed = time.monotonic()
        (stale,) = _poll(lambda: [j for j in _jobs(rt).values() if j["state"] == "stale"], bool,
                         timeout=LEASE_S + 2, every=0.05)
        assert time.monotonic() - killed <= LEASE_S + 0.5
        out = reco(env, "status").stdout
        assert f"shard {stale['shard']} stale since" in out and "1 stale" in out, out
        v = reco(env, "memory", "verify", "stale", "--version", "1", check=False)
        assert v.returncode == 1 and "not ready: building" in v.stdout and "1 stale" in v.stdout, \
            (v.returncode, v.stdout, v.stderr)
        time.sleep(max(0.0, killed + 2 * LEASE_S + 1 - time.monotonic()))  # its heartbeat has aged out
        r = reco(env, "memory", "build", "third", other, "--backbone", tiny_config, "--no-wait")
        assert "no worker is alive" in r.stderr, r.stderr  # now it is true
        second = start_worker(env, tmp_path, "sb")
        r = reco(env, "memory", "resume", "stale", "1", "--timeout", "180")
        assert "stale v1 ready" in r.stdout, r.stdout + r.stderr
        assert_clean(env, "stale", 1, 3 * 600)
        for name in ("other", "third"):
            assert wait_ready(env, name, logs=[tmp_path / "sb.log"]) == "ready"
            assert_clean(env, name, 1, 8)
    finally:
        rt.close()
        stop(w, second)


def test_redis_restarted_without_persistence_mid_build(tmp_path, own_pg, redis_volatile, tiny_config):
    """The queued messages vanish with the restart; the shards' rows say they are pending with no message, and the
    sweeper sends them again."""
    env = {**_env(tmp_path, own_pg, redis_volatile), "_name": "rd"}
    src = synthetic.write_wds(tmp_path / "wds", n_shards=10, per_shard=80)[0].parent
    w = start_worker(env, tmp_path, "rw")
    try:
        reco(env, "memory", "build", "rd", src, "--backbone", tiny_config, "--no-wait")
        _poll(lambda: [sh["state"] for sh in _shards(env)],
              lambda st: "done" in st and st.count("pending") >= 3, timeout=180, every=0.05)
        redis_volatile.restart()
        import redis

        client = redis.Redis(host="127.0.0.1", port=redis_volatile.port, password=redis_volatile.password)
        assert client.llen("ingest") == 0  # the queued shard messages are gone
        assert wait_ready(env, "rd", logs=[tmp_path / "rw.log"], timeout=240) == "ready"
        assert_clean(env, "rd", 1, 10 * 80)
    finally:
        stop(w)


def test_postgres_down_longer_than_the_retry_budget(tmp_path, own_pg, redis_aof, tiny_config):
    """Tasks use up their retries while the database is down and are dropped by Celery; the shards stay pending or
    under an expiring lease, and the sweeper sends them again once the database is back. No secret is printed."""
    env = {**_env(tmp_path, own_pg, redis_aof, RECO_TASK_RETRIES="2"), "_name": "pg"}
    src = synthetic.write_wds(tmp_path / "wds", n_shards=8, per_shard=80)[0].parent
    w = start_worker(env, tmp_path, "pw")
    outputs = [reco(env, "info").stdout]
    try:
        reco(env, "memory", "build", "pg", src, "--backbone", tiny_config, "--no-wait")
        rt = _runtime(env)  # polled in-process: a CLI call can take longer than the whole build on a busy machine
        try:
            _poll(lambda: _running(rt), bool, timeout=120, every=0.02)
        finally:
            rt.close()
        own_pg.stop()
        down = reco(env, "memory", "list", check=False)
        outputs.append(down.stdout + down.stderr)
        assert down.returncode == 1 and "cannot reach the metadata database" in down.stderr
        time.sleep(25)  # 2 retries back off about 2 + 4 s: every task in flight gives up meanwhile
        own_pg.start()
        assert wait_ready(env, "pg", logs=[tmp_path / "pw.log"], timeout=240) == "ready"
        assert_clean(env, "pg", 1, 8 * 80)
        log = (tmp_path / "pw.log").read_text()
        assert "re-queued" in log, log[-3000:]  # the sweeper, not the broker, brought the shards back
        # a password with an @ in it, raw or percent-encoded: masked in settings and in a connection error
        for url in (own_pg.url("reco", auth=f"postgres:p@ss-{PG_SECRET}"),
                    own_pg.url("reco", auth=f"postgres:p%40ss-{PG_SECRET}").replace(str(own_pg.port), "1")):
            bad = {**env, "RECO_DATABASE_URL": url}
            for args in (("info",), ("memory", "list")):
                r = reco(bad, *args, check=False)
                outputs.append(r.stdout + r.stderr)
    finally:
        stop(w)
    texts = outputs + [(tmp_path / "pw.log").read_text()]
    assert any("password=***" in t for t in texts) and any("postgres:***@" in t for t in texts)
    leaks = [t for t in texts if PG_SECRET in t]
    assert not leaks, f"secret printed: {leaks[0][:2000]}"
