"""`reco status` in the embedded profile: versions building, running and failed jobs, from the database."""

import json
from datetime import timedelta

from app import synthetic
from app.build import start_build
from app.db.models import FusionModel, IngestShard, ModelStatus, ShardStatus, utcnow


def test_status_lists_building_versions_and_failed_jobs(rt, cli_run, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=2, per_shard=4)[0].parent
    v = start_build(rt, "pending", str(src), backbone=tiny_config)  # registered, nothing ingested yet
    with rt.db.session() as s:
        live, lost = s.query(IngestShard).filter_by(version_id=v.id).order_by(IngestShard.index).all()
        live.status, live.attempts, live.worker, live.heartbeat_at = ShardStatus.RUNNING, 1, "w1@h:7", utcnow()
        lost.status, lost.attempts, lost.worker = ShardStatus.RUNNING, 1, "w2@h:8"
        lost.heartbeat_at = utcnow() - timedelta(seconds=rt.settings.lease_s + 5)  # its worker died
        s.add(FusionModel(name="broken", status=ModelStatus.FAILED, backbone=tiny_config, dim=64,
                          memory_name="pending", memory_version=1, pairs_name="pending", pairs_version=1,
                          config={}, checkpoint_dir=str(tmp_path / "ck"), error="loss became non-finite"))
    st = json.loads(cli_run("status", "--json").output)
    assert st["profile"] == "embedded" and st["queues"] == {}
    (b,) = st["building_versions"]
    assert b["memory"] == "pending" and b["shards"] == {"pending": 0, "running": 1, "stale": 1, "done": 0,
                                                         "failed": 0}
    jobs = {j["shard"]: j for j in st["running_jobs"]}
    assert jobs[0]["state"] == "running" and jobs[0]["worker"] == "w1@h:7" and jobs[0]["heartbeat_age_s"] < 30
    assert jobs[0]["stale_since"] is None
    assert jobs[1]["state"] == "stale" and jobs[1]["worker"] == "w2@h:8" and jobs[1]["stale_since"]
    assert {"kind": "train", "model": "broken", "error": "loss became non-finite"} in st["failed_jobs"]
    out = cli_run("status").output
    assert "pending v1 building: 0/2 shards done, 1 running, 1 stale" in out and "train broken: loss became" in out
    assert "shard 0 on w1@h:7" in out and "shard 1 stale since" in out
    shown = json.loads(cli_run("memory", "show", "pending", "--version", "1", "--json").output)
    assert [sh["state"] for sh in shown["shards"]] == ["running", "stale"]
    r = cli_run("memory", "verify", "pending", "--version", "1", ok=False)  # not ready: never OK
    assert r.exit_code == 1 and "not ready: building, 0/2 shards done (1 running, 1 stale)" in r.output
    assert "reco memory resume pending 1" in r.output
