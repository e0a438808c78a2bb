"""`reco status` in the embedded profile: versions building, running and failed jobs, from the database."""

import json

from app import synthetic
from app.build import start_build
from app.db.models import FusionModel, IngestShard, ModelStatus, ShardStatus


def test_status_lists_building_versions_and_failed_jobs(rt, cli_run, tmp_path, tiny_config):
    src = synthetic.write_wds(tmp_path / "wds", n_shards=2, per_shard=4)[0].parent
    v = start_build(rt, "pending", str(src), backbone=tiny_config)  # registered, nothing ingested yet
    with rt.db.session() as s:
        shard = s.query(IngestShard).filter_by(version_id=v.id, index=0).one()
        shard.status, shard.attempts = ShardStatus.RUNNING, 1
        s.add(FusionModel(name="broken", status=ModelStatus.FAILED, backbone=tiny_config, dim=64,
                          memory_name="pending", memory_version=1, pairs_name="pending", pairs_version=1,
                          config={}, checkpoint_dir=str(tmp_path / "ck"), error="loss became non-finite"))
    st = json.loads(cli_run("status", "--json").output)
    assert st["profile"] == "embedded" and st["queues"] == {}
    (b,) = st["building_versions"]
    assert b["memory"] == "pending" and b["shards"] == {"pending": 1, "running": 1, "done": 0, "failed": 0}
    assert st["running_jobs"] == [{"kind": "ingest", "memory": "pending", "version": 1, "shard": 0, "attempts": 1,
                                   "started_at": None}]
    assert {"kind": "train", "model": "broken", "error": "loss became non-finite"} in st["failed_jobs"]
    out = cli_run("status").output
    assert "pending v1 building: 0/2 shards done, 1 running" in out and "train broken: loss became" in out
