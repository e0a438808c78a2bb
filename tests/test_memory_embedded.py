"""The embedded profile end to end through the CLI: build, list, show, verify, query, activate, delete."""

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import synthetic
from app.build import start_build
from app.db.models import IngestShard, MemoryVersion, VersionStatus, utcnow
from app.ingest import run_shard


def _build(cli_run, name, source, tiny_config, *extra, ok=True):
    return cli_run("memory", "build", name, source, "--backbone", tiny_config, *extra, ok=ok)


def test_build_list_show_verify_query(cli_run, wds_corpus, tiny_config):
    r = _build(cli_run, "shapes", wds_corpus, tiny_config, "--activate")
    assert "shapes v1 ready (active): 24 items stored, 0 skipped" in r.output

    listed = json.loads(cli_run("memory", "list", "--json").stdout)
    assert listed[0]["name"] == "shapes"
    v = listed[0]["versions"][0]
    assert (v["version"], v["status"], v["active"], v["items_stored"], v["dim"]) == (1, "ready", True, 24, 64)
    assert v["backbone"] == tiny_config and len(v["backbone_hash"]) == 64

    shown = json.loads(cli_run("memory", "show", "shapes", "--json").stdout)
    assert [s["status"] for s in shown["shards"]] == ["done"] * 3
    assert [s["items_stored"] for s in shown["shards"]] == [8, 8, 8]

    verified = json.loads(cli_run("memory", "verify", "shapes", "--json").stdout)
    assert verified["ok"] and verified["store_count"] == 24 == verified["shard_sum"]

    hits = json.loads(cli_run("memory", "query", "shapes", "--text", "a red square", "-k", "3", "--json").stdout)
    assert len(hits) == 3 and hits[0]["caption"] == "a red square"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_query_by_image_finds_the_same_picture(cli_run, wds_corpus, tiny_config, tmp_path):
    _build(cli_run, "shapes", wds_corpus, tiny_config, "--activate")
    key, png, cap = synthetic.items(3)[2]
    (tmp_path / "q.png").write_bytes(png)
    hits = json.loads(cli_run("memory", "query", "shapes", "--image", tmp_path / "q.png", "-k", "2", "--json").stdout)
    assert hits[0]["key"] == key and hits[0]["caption"] == cap


def test_versions_activate_and_delete(cli_run, wds_corpus, tiny_config):
    _build(cli_run, "shapes", wds_corpus, tiny_config, "--activate")
    _build(cli_run, "shapes", wds_corpus, tiny_config)
    versions = json.loads(cli_run("memory", "list", "--json").stdout)[0]["versions"]
    assert [(v["version"], v["active"]) for v in versions] == [(1, True), (2, False)]

    cli_run("memory", "activate", "shapes", "2")
    versions = json.loads(cli_run("memory", "list", "--json").stdout)[0]["versions"]
    assert [(v["version"], v["status"], v["active"]) for v in versions] == [(1, "retired", False), (2, "ready", True)]

    r = cli_run("memory", "delete", "shapes", "2", ok=False)
    assert r.exit_code != 0 and "active version" in r.output and "--force" in r.output
    cli_run("memory", "activate", "shapes", "1")  # a retired version can come back (rollback)
    cli_run("memory", "delete", "shapes", "2")
    versions = json.loads(cli_run("memory", "list", "--json").stdout)[0]["versions"]
    assert [v["version"] for v in versions] == [1]
    cli_run("memory", "delete", "shapes", "1", "--force")
    r = cli_run("memory", "query", "shapes", "--text", "x", ok=False)
    assert r.exit_code == 1 and "no active version" in r.output


def test_item_problems_are_skipped_and_counted(cli_run, tmp_path, tiny_config):
    import io
    import tarfile

    good = synthetic.items(4)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for key, png, cap in good:
            add(f"{key}.png", png)
            add(f"{key}.txt", cap.encode())
        add("corrupt.png", b"\x89PNG\r\n\x1a\nnot really")
        add("corrupt.txt", b"a corrupt picture")
        add("trunc.png", good[0][1][: len(good[0][1]) // 2])
        add("trunc.txt", b"a truncated picture")
        add("nocap.png", good[1][1])
        add("nocap.txt", b"   ")
        add("../escape.png", good[2][1])
        add("../escape.txt", b"outside")
        add("noimage.txt", b"a caption without a picture")
    r = _build(cli_run, "mixed", tmp_path, tiny_config)
    assert "4 items stored, 5 skipped" in r.output
    shown = json.loads(cli_run("memory", "show", "mixed", "--json").stdout)
    assert shown["skip_reasons"] == {"corrupt_image": 2, "empty_caption": 1, "unsafe_path": 1, "missing_image": 1}
    assert json.loads(cli_run("memory", "verify", "mixed", "--json").stdout)["ok"]


def test_manifest_and_embeddings_sources(cli_run, tmp_path, tiny_config):
    manifest = synthetic.write_manifest(tmp_path / "m", 10, kind="csv")
    r = _build(cli_run, "man", manifest, tiny_config, "--shard-size", "4")
    assert "10 items stored" in r.output
    shown = json.loads(cli_run("memory", "show", "man", "--json").stdout)
    assert shown["format"] == "manifest" and len(shown["shards"]) == 3

    emb = synthetic.write_embeddings(tmp_path / "e", parts=2, per_part=5, dim=64)
    r = _build(cli_run, "emb", emb, tiny_config)
    assert "10 items stored" in r.output
    assert json.loads(cli_run("memory", "verify", "emb", "--json").stdout)["ok"]


@pytest.mark.parametrize(
    "case",
    ["bad_name", "missing_column", "wrong_dim", "unknown_backbone", "missing_source", "activate_missing"],
)
def test_bad_input_stops_with_one_line_and_leaves_no_version(cli_run, tmp_path, tiny_config, case):
    manifest = synthetic.write_manifest(tmp_path / "m", 3)
    emb = synthetic.write_embeddings(tmp_path / "e", parts=1, per_part=3, dim=32)
    args, expect = {
        "bad_name": (["memory", "build", "Bad.Name", manifest, "--backbone", tiny_config], "invalid memory name"),
        "missing_column": (["memory", "build", "m", manifest, "--backbone", tiny_config, "--caption-column", "text"],
                           "no caption column 'text'"),
        "wrong_dim": (["memory", "build", "m", emb, "--backbone", tiny_config], "dimension 32"),
        "unknown_backbone": (["memory", "build", "m", manifest, "--backbone", "ViT-Nope"], "unknown backbone"),
        "missing_source": (["memory", "build", "m", tmp_path / "nope.tar", "--backbone", tiny_config], "not found"),
        "activate_missing": (["memory", "activate", "m", "1"], "no memory named"),
    }[case]
    r = cli_run(*args, ok=False)
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expect in lines[0]
    assert json.loads(cli_run("memory", "list", "--json").stdout) == []


def test_failed_version_cannot_be_activated(cli_run, tmp_path, tiny_config):
    import tarfile

    with tarfile.open(tmp_path / "00000.tar", "w"):
        pass  # an empty shard: nothing can be stored
    r = _build(cli_run, "empty", tmp_path, tiny_config, ok=False)
    assert r.exit_code == 1 and "failed" in r.output
    r = cli_run("memory", "activate", "empty", "1", ok=False)
    assert r.exit_code == 1 and "not ready" in r.output


def test_a_shard_that_runs_twice_stores_each_item_once(rt, wds_corpus, tiny_config):
    v = start_build(rt, "twice", str(wds_corpus), backbone=tiny_config)
    with rt.db.session() as s:
        ids = s.scalars(select(IngestShard.id).where(IngestShard.version_id == v.id).order_by(IngestShard.index)).all()
    run_shard(rt, ids[0])
    with rt.db.session() as s:  # a worker that died after upserting but before marking the shard done ...
        sh = s.get(IngestShard, ids[0])
        sh.status, sh.worker, sh.heartbeat_at = "running", "dead@host:1", utcnow()
    assert run_shard(rt, ids[0])["held_by"] == "dead@host:1"  # ... holds a live lease: nobody else takes it
    with rt.db.session() as s:  # ... until its lease expires
        s.get(IngestShard, ids[0]).heartbeat_at = utcnow() - timedelta(seconds=rt.settings.lease_s + 1)
    run_shard(rt, ids[0])
    for sid in ids[1:]:
        run_shard(rt, sid)
    run_shard(rt, ids[1])  # a redelivered message for a finished shard does nothing
    with rt.db.session() as s:
        version = s.get(MemoryVersion, v.id)
        assert version.status == "ready" and version.items_stored == 24
        assert s.get(IngestShard, ids[0]).attempts == 2
    assert rt.store.count(v.collection) == 24


def test_concurrent_builds_get_distinct_versions(rt, wds_corpus, tiny_config):
    import threading

    versions, errors = [], []

    def build():
        try:
            versions.append(start_build(rt, "race", str(wds_corpus), backbone=tiny_config).version)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(versions) == [1, 2, 3, 4]


def test_unreachable_services_fail_with_one_line(cli_run, monkeypatch, wds_corpus, tiny_config):
    monkeypatch.setenv("RECO_DATABASE_URL", "postgresql+psycopg://reco:secret@127.0.0.1:1/reco")
    r = cli_run("memory", "list", ok=False)
    assert r.exit_code == 1 and "cannot reach the metadata database" in r.output and "secret" not in r.output
    monkeypatch.delenv("RECO_DATABASE_URL")

    monkeypatch.setenv("RECO_QDRANT_URL", "http://127.0.0.1:1")
    r = _build(cli_run, "q", wds_corpus, tiny_config, ok=False)
    assert r.exit_code == 1 and "RECO_QDRANT_URL" in r.output
    monkeypatch.delenv("RECO_QDRANT_URL")

    monkeypatch.setenv("RECO_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")
    import importlib

    import workers.celery_app

    importlib.reload(workers.celery_app)
    try:
        r = _build(cli_run, "b", wds_corpus, tiny_config, ok=False)
        assert r.exit_code == 1 and "cannot reach the task broker" in r.output and "hunter2" not in r.output
    finally:
        monkeypatch.delenv("RECO_BROKER_URL")
        importlib.reload(workers.celery_app)
    assert json.loads(cli_run("memory", "list", "--json").stdout) == []


def test_verify_reports_a_mismatch_with_exit_1(cli_run, rt, wds_corpus, tiny_config):
    _build(cli_run, "shapes", wds_corpus, tiny_config)
    with rt.db.session() as s:
        collection = s.scalar(select(MemoryVersion.collection))
    some = next(rt.store.iter_ids(collection, batch=2))
    from qdrant_edge import UpdateOperation

    with rt.store._open(collection) as shard:  # lose two points behind the metadata's back
        import uuid

        shard.update(UpdateOperation.delete_points([uuid.UUID(i) for i in some]))
    r = cli_run("memory", "verify", "shapes", ok=False)
    assert r.exit_code == 1 and "store holds 22 points, the metadata 24" in r.output


def test_server_backend_through_the_whole_pipeline(cli_run, monkeypatch, tmp_path, wds_corpus, tiny_config):
    """The same commands against the qdrant-client backend (its local mode standing in for a server)."""
    monkeypatch.setenv("RECO_QDRANT_URL", f"path:{tmp_path / 'qdrant'}")
    _build(cli_run, "srv", wds_corpus, tiny_config, "--activate")
    _build(cli_run, "srv", wds_corpus, tiny_config)
    cli_run("memory", "activate", "srv", "2")
    verified = json.loads(cli_run("memory", "verify", "srv", "--json").stdout)
    assert verified["ok"] and verified["version"] == 2 and verified["store_count"] == 24
    hits = json.loads(cli_run("memory", "query", "srv", "--text", "a green square", "-k", "1", "--json").stdout)
    assert hits[0]["caption"] == "a green square"
    from app.store.server import ServerStore

    cli_run("memory", "delete", "srv", "1")
    s = ServerStore(f"path:{tmp_path / 'qdrant'}")
    try:
        assert s.alias_target("reco-srv") == "reco-srv-v2"
        assert not s.exists("reco-srv-v1")
    finally:
        s.close()


def test_finalize_recovers_a_version_whose_finaliser_died(cli_run, rt, wds_corpus, tiny_config):
    """A finaliser killed mid-seal leaves the version `finalizing` with every shard done."""
    v = start_build(rt, "stuck", str(wds_corpus), backbone=tiny_config, activate=True)
    with rt.db.session() as s:
        shard_ids = s.scalars(select(IngestShard.id).where(IngestShard.version_id == v.id)).all()
    for sid in shard_ids:
        run_shard(rt, sid, finalize=False)
    with rt.db.session() as s:
        s.get(MemoryVersion, v.id).status = "finalizing"  # what the dead finaliser's claim left behind
    r = cli_run("memory", "activate", "stuck", "1", ok=False)
    assert r.exit_code != 0 and "finalizing" in r.output

    r = cli_run("memory", "finalize", "stuck", "1")
    assert "stuck v1 ready" in r.output
    verified = json.loads(cli_run("memory", "verify", "stuck", "--json").stdout)
    assert verified["ok"] and verified["store_count"] == 24 and verified["status"] == "ready"
    assert json.loads(cli_run("memory", "list", "--json").stdout)[0]["versions"][0]["active"]  # --activate kept

    r = cli_run("memory", "finalize", "stuck", "1", ok=False)
    assert r.exit_code != 0 and "is ready" in r.output


def test_finalize_refuses_a_version_with_shards_not_done(cli_run, rt, wds_corpus, tiny_config):
    v = start_build(rt, "half", str(wds_corpus), backbone=tiny_config)
    with rt.db.session() as s:
        first = s.scalars(select(IngestShard.id).where(IngestShard.version_id == v.id)).first()
    run_shard(rt, first)
    r = cli_run("memory", "finalize", "half", "1", ok=False)
    assert r.exit_code != 0 and "2 shard(s) not done" in r.output


def test_storage_options_are_recorded_and_shown(cli_run, wds_corpus, tiny_config):
    cli_run("memory", "build", "q", wds_corpus, "--backbone", tiny_config, "--quantization", "int8", "--on-disk")
    cli_run("memory", "build", "q", wds_corpus, "--backbone", tiny_config)  # auto: small, so exact and unquantized
    shown = cli_run("memory", "show", "q", "--version", "1").output
    assert "int8 vectors (asked: int8), originals on disk (memory-mapped)" in shown
    assert "none vectors (asked: auto), originals in RAM" in cli_run("memory", "show", "q", "--version", "2").output
    d = json.loads(cli_run("memory", "show", "q", "--version", "1", "--json").output)
    assert (d["quantization"], d["on_disk"], d["storage"]) == ("int8", True, {"quantization": "int8", "on_disk": True})
    r = cli_run("memory", "build", "q", wds_corpus, "--backbone", tiny_config, "--quantization", "pq", ok=False)
    assert r.exit_code == 1 and "'pq' is not one of 'auto', 'none', 'int8', 'binary'" in r.output
    cli_run("memory", "activate", "q", "1")
    hits = cli_run("memory", "query", "q", "--text", "a red circle", "-k", "3").output  # v1 quantized, searched
    assert hits.count("\n") >= 3


def test_verify_reports_a_building_version_whose_store_cannot_be_opened(cli_run, rt, wds_corpus, tiny_config,
                                                                        monkeypatch):
    """A worker killed before the engine wrote its first segment leaves a collection that cannot be opened: verify
    says the version is not ready, where it raised a traceback (seen on CI in tests/test_leases.py)."""
    from app.memory import verify

    _build(cli_run, "opening", wds_corpus, tiny_config)
    with rt.db.session() as s:
        s.query(MemoryVersion).update({MemoryVersion.status: VersionStatus.BUILDING})

    def unopenable(collection):
        raise RuntimeError("Service runtime error: edge config is not provided and no segments were loaded")

    monkeypatch.setattr(rt.store, "count", unopenable)
    report = verify(rt, "opening", 1)
    assert report.store_count == 0 and any(p.startswith("not ready: building") for p in report.problems)
    with rt.db.session() as s:  # a ready version's unopenable store is still an error, not a zero
        s.query(MemoryVersion).update({MemoryVersion.status: VersionStatus.READY})
    with pytest.raises(RuntimeError, match="no segments"):
        verify(rt, "opening", 1)
