"""`reco memory export` / `import`: round trips into either profile, and every damaged or mismatched export refused
before anything is stored."""

import json

import numpy as np
import pytest

from app import synthetic
from app.build import build_in_process, run_in_process, start_build
from app.errors import RecoError
from app.memory import list_memories, verify
from app.query import query_memory
from app.runtime import Runtime
from app.settings import Settings
from app.transfer.memory import export_version, read_export, start_import

QUERIES = ["a picture of a red circle.", "a picture of a blue square.", "a green triangle"]


@pytest.fixture
def built(rt, tmp_path, tiny_config):
    synthetic.write_wds(tmp_path / "src", 3, 20, seed=2, jitter=0.3)
    build_in_process(rt, "shapes", str(tmp_path / "src"), backbone=tiny_config, activate=True)
    return rt


def _answers(rt, name):
    """Each query's ranking of the whole memory as (key, caption, score); equal scores (identical captions) in
    key order, since the engine breaks ties by point id, which differs between memories."""
    return [sorted(((h.payload["key"], h.payload["caption"], round(h.score, 5)) for h in
                    query_memory(rt, name, text=q, k=60)), key=lambda x: (-x[2], x[0])) for q in QUERIES]


def test_round_trip_in_the_same_profile_gives_identical_search_results(built, cli_run, tmp_path):
    r = cli_run("memory", "export", "shapes", tmp_path / "out", "--part-rows", "25")
    assert "60 items in 3 part(s)" in r.output
    m = read_export(tmp_path / "out")
    assert [p["rows"] for p in m["parts"]] == [25, 25, 10] and m["count"] == 60 and m["dim"] == 64
    assert (tmp_path / "out" / "img_emb" / "img_emb_2.npy").is_file() and len(m["files"]) == 9
    r = cli_run("memory", "import", tmp_path / "out", "--as", "copy", "--activate")
    assert "copy v1 verified: 60 points" in r.output
    assert _answers(built, "copy") == _answers(built, "shapes")
    hit = query_memory(built, "copy", text=QUERIES[0], k=1)[0]
    assert hit.payload["src"]["tar"].endswith(".tar")  # where its image can be read again travels too
    again = cli_run("memory", "import", tmp_path / "out", "--activate")  # a new version of the same name
    assert "shapes v2 verified" in again.output
    assert [v["version"] for m_ in list_memories(built) if m_["name"] == "shapes" for v in m_["versions"]] == [1, 2]


def test_round_trip_into_the_server_profile(built, tmp_path, monkeypatch):
    export_version(built, "shapes@1", tmp_path / "out")
    monkeypatch.setenv("RECO_HOME", str(tmp_path / "cluster-home"))
    monkeypatch.setenv("RECO_QDRANT_URL", ":memory:")  # qdrant-client's local mode speaks the server API
    server = Runtime(Settings.from_env())
    try:
        assert server.store.kind == "server"
        v = start_import(server, tmp_path / "out", activate=True)
        run_in_process(server, v.id, show_progress=False)
        assert verify(server, "shapes").ok
        theirs, ours = _answers(server, "shapes"), _answers(built, "shapes")
        assert [[(k, c) for k, c, _ in row] for row in theirs] == [[(k, c) for k, c, _ in row] for row in ours]
        np.testing.assert_allclose([[s for *_, s in row] for row in theirs], [[s for *_, s in row] for row in ours],
                                   atol=1e-4)
    finally:
        server.close()


def _damage(root, how):
    f = root / "img_emb" / "img_emb_0.npy"
    if how == "tampered":
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "missing file":
        (root / "metadata" / "metadata_0.parquet").unlink()
    elif how == "no manifest":
        (root / "manifest.json").unlink()
    elif how == "manifest not json":
        (root / "manifest.json").write_text("{nope")
    elif how == "count changed":
        m = json.loads((root / "manifest.json").read_text())
        m["count"] += 1
        (root / "manifest.json").write_text(json.dumps(m))
    elif how == "file outside":
        m = json.loads((root / "manifest.json").read_text())
        m["files"]["../elsewhere.npy"] = {"bytes": 1, "sha256": "0"}
        (root / "manifest.json").write_text(json.dumps(m))
    elif how == "other backbone":
        m = json.loads((root / "manifest.json").read_text())
        m["backbone_hash"] = "0" * 64
        (root / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("how, says", [
    ("tampered", "does not match its sha256"),
    ("truncated", "is truncated or was changed"),
    ("missing file", "metadata/metadata_0.parquet is missing"),
    ("no manifest", "no manifest.json"),
    ("manifest not json", "not readable JSON"),
    ("count changed", "the parts hold 60 rows, the manifest says 61"),
    ("file outside", "outside the export"),
    ("other backbone", "another model or other weights"),
])
def test_a_damaged_or_mismatched_export_is_refused_before_anything_is_stored(built, cli_run, tmp_path, how, says):
    export_version(built, "shapes", tmp_path / "out")
    _damage(tmp_path / "out", how)
    r = cli_run("memory", "import", tmp_path / "out", "--as", "copy", ok=False)
    assert r.exit_code == 1 and says in r.output and "Traceback" not in r.output, r.output
    assert "copy" not in [m["name"] for m in list_memories(built)]


def test_import_checks_the_backbone_given_and_the_memory_it_joins(built, cli_run, tmp_path, tiny_config):
    export_version(built, "shapes", tmp_path / "out")
    other = tmp_path / "other.json"
    cfg = json.loads(open(tiny_config).read())
    cfg["text_cfg"]["layers"] = cfg["text_cfg"]["layers"] + 1
    other.write_text(json.dumps(cfg))
    r = cli_run("memory", "import", tmp_path / "out", "--as", "copy", "--backbone", other, ok=False)
    assert r.exit_code == 1 and "another model or other weights" in r.output
    synthetic.write_wds(tmp_path / "o", 1, 8, seed=3, jitter=0.3)
    build_in_process(built, "theirs", str(tmp_path / "o"), backbone=str(other))
    r = cli_run("memory", "import", tmp_path / "out", "--as", "theirs", ok=False)
    assert r.exit_code == 1 and "holds versions of another backbone" in r.output


def test_export_refuses_a_version_still_building_and_a_used_directory(built, tiny_config, tmp_path, cli_run):
    synthetic.write_wds(tmp_path / "more", 1, 8, seed=4, jitter=0.3)
    start_build(built, "shapes", str(tmp_path / "more"), backbone=tiny_config)  # v2 registered, not ingested
    with pytest.raises(RecoError, match="v2 is building: only a ready version can be exported"):
        export_version(built, "shapes@2", tmp_path / "x")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "f").write_text("x")
    r = cli_run("memory", "export", "shapes", tmp_path / "used", ok=False)
    assert r.exit_code == 1 and "is not an empty directory" in r.output
    assert not (tmp_path / "x").exists()
