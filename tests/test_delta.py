"""Memories that grow and forget: delta versions (`reco memory build --from`, `--remove-keys`) and takedowns
(`reco memory forget`, `--all-versions`, `--resume`), on both store backends and with every storage option."""

import json
from contextlib import contextmanager

import numpy as np
import pytest

from app import synthetic
from app.store.server import ServerStore

STORAGE = {"auto": [], "none": ["--quantization", "none"], "int8": ["--quantization", "int8"],
           "binary": ["--quantization", "binary"], "int8-on-disk": ["--quantization", "int8", "--on-disk"]}
DIM = 64  # the tiny config's


@pytest.fixture(params=["embedded", "server"])
def backend(request, monkeypatch, tmp_path):
    if request.param == "server":  # qdrant-client's local mode standing in for a server
        monkeypatch.setenv("RECO_QDRANT_URL", f"path:{tmp_path / 'qdrant'}")
    return request.param


@pytest.fixture
def corpora(tmp_path):
    """base: 20 items, keys 000000000-000000009 and 000100000-000100009; update: 5 items with the first five
    keys of base (new vectors); new: 4 items with keys of their own."""
    return {"base": synthetic.write_embeddings(tmp_path / "base", parts=2, per_part=10, dim=DIM, seed=1),
            "update": synthetic.write_embeddings(tmp_path / "update", parts=1, per_part=5, dim=DIM, seed=2),
            "new": synthetic.write_embeddings(tmp_path / "new", parts=1, per_part=4, dim=DIM, seed=3, prefix="n")}


def _keys_file(tmp_path, *keys, name="keys.txt"):
    path = tmp_path / name
    path.write_text("\n".join(keys) + "\n")
    return path


def _show(cli_run, name, version=None):
    args = ["memory", "show", name, "--json"] + (["--version", version] if version else [])
    return json.loads(cli_run(*args).stdout)


def _store_keys(rt, collection):
    return sorted(p["key"] for _ids, _v, ps in rt.store.scan_vectors(collection, ["image"]) for p in ps)


def _vectors(path, part=0):
    return np.load(path / "img_emb" / f"img_emb_{part}.npy").astype(np.float32)


@contextmanager
def _runtime():
    """A runtime of its own, closed before the next command (qdrant-client's local mode locks its path)."""
    from app.runtime import Runtime
    from app.settings import Settings

    r = Runtime(Settings.from_env())
    try:
        yield r
    finally:
        r.close()


@pytest.mark.parametrize("option", list(STORAGE))
def test_a_delta_holds_its_parent_minus_removed_plus_added_with_updates_counted(cli_run, backend, corpora, tmp_path,
                                                                               tiny_config, option):
    cli_run("memory", "build", "m", corpora["base"], "--backbone", tiny_config, "--activate", *STORAGE[option])
    keys = _keys_file(tmp_path, "000100000", "000100001", "not-there")
    r = cli_run("memory", "build", "m", corpora["update"], "--from", "1", "--remove-keys", keys)
    assert "v2 = v1 + 0 − 2 (5 updated; v1 had 20)" in r.output
    r = cli_run("memory", "build", "m", corpora["new"], "--from", "2")
    assert "v3 = v2 + 4 − 0 (0 updated; v2 had 18)" in r.output

    v1, v2, v3 = (_show(cli_run, "m", n) for n in ("1", "2", "3"))
    assert (v1["items_stored"], v2["items_stored"], v3["items_stored"]) == (20, 18, 22)
    assert v2["parent_version"] == 1 and v3["parent_version"] == 2 and v1["parent_version"] is None
    assert v2["details"]["lineage"] == {"parent": 1, "parent_items": 20, "added": 0, "updated": 5, "removed": 2}
    assert v2["skip_reasons"] == {"removed": 2, "updated": 5}
    # storage options are the parent's, asked and applied
    assert v2["quantization"] == v3["quantization"] == v1["quantization"] and v3["on_disk"] == v1["on_disk"]
    assert v3["storage"] == v1["storage"]
    for n in (1, 2, 3):
        assert json.loads(cli_run("memory", "verify", "m", "--version", n, "--json").stdout)["ok"]

    with _runtime() as rt:
        assert "000100000" in _store_keys(rt, "reco-m-v1") and "000100000" not in _store_keys(rt, "reco-m-v3")
        assert len(_store_keys(rt, "reco-m-v3")) == len(set(_store_keys(rt, "reco-m-v3"))) == 22
        assert {"n000000000", "000000004", "000100009"} <= set(_store_keys(rt, "reco-m-v3"))
        # an updated key holds the delta's vector, not its parent's
        q = _vectors(corpora["update"])[:1]
        q /= np.linalg.norm(q)
        top = rt.store.search("reco-m-v3", q, "image", 1)[0][0]
        assert top.payload["key"] == "000000000" and top.payload["version"] == 2 and top.score > 0.99
        assert rt.store.storage("reco-m-v3") == rt.store.storage("reco-m-v1")
    cli_run("memory", "activate", "m", "3")
    hits = json.loads(cli_run("memory", "query", "m", "--text", "anything", "-k", "22", "--json").stdout)
    assert len(hits) == 22


def test_a_delta_is_encoded_from_images_only_for_what_is_new(cli_run, tmp_path, tiny_config, monkeypatch):
    """A delta of a wds corpus encodes the delta's items only: the parent's come over as stored."""
    from app.backbone import Backbone

    base = synthetic.write_wds(tmp_path / "a", n_shards=2, per_shard=8)[0].parent
    more = synthetic.write_wds(tmp_path / "b", n_shards=1, per_shard=4, seed=5, prefix="more-")[0].parent
    cli_run("memory", "build", "w", base, "--backbone", tiny_config, "--activate")
    encoded = []
    real = Backbone.encode_image_tensor
    monkeypatch.setattr(Backbone, "encode_image_tensor", lambda self, x: encoded.append(len(x)) or real(self, x))
    r = cli_run("memory", "build", "w", more, "--from", "active")
    assert sum(encoded) == 4 and "w v2 ready" in r.output
    assert _show(cli_run, "w", "2")["items_stored"] == 20
    assert json.loads(cli_run("memory", "verify", "w", "--version", "2", "--json").stdout)["ok"]


def test_forget_by_default_builds_a_delta_without_the_keys(cli_run, backend, corpora, tmp_path, tiny_config):
    cli_run("memory", "build", "m", corpora["base"], "--backbone", tiny_config, "--activate")
    r = cli_run("memory", "forget", "m", "--keys", _keys_file(tmp_path, "000000001", "000100005"),
                "--reason", "privacy request")
    assert "takedown #1 (version) done: 2 keys, -> v2" in r.output and "reco memory activate m 2" in r.output
    shown = _show(cli_run, "m", "2")
    assert shown["items_stored"] == 18 and not shown["active"]
    assert shown["takedowns"][0]["reason"] == "privacy request" and shown["takedowns"][0]["points_removed"] == 2
    with _runtime() as rt:
        assert "000000001" not in _store_keys(rt, "reco-m-v2") and "000000001" in _store_keys(rt, "reco-m-v1")
    r = cli_run("memory", "forget", "m", "--keys", _keys_file(tmp_path, "000000002"), "--activate")
    assert _show(cli_run, "m")["version"] == 3  # active, built from the active v1
    assert _show(cli_run, "m", "3")["items_stored"] == 19


def test_forget_all_versions_reaches_every_version_export_cache_and_later_build(cli_run, backend, corpora,
                                                                                 tmp_path, tiny_config, reco_env):
    from app.caches import cache_dir, open_dir

    cli_run("memory", "build", "m", corpora["base"], "--backbone", tiny_config, "--activate")
    cli_run("memory", "build", "m", corpora["new"], "--from", "1")
    cli_run("memory", "build", "other", corpora["base"], "--backbone", tiny_config)
    caches = [open_dir(cache_dir(reco_env, "pairs", {"collection": c, "created": "t"}), {"collection": c})
              for c in ("reco-m-v1", "reco-m-v2", "reco-other-v1")]
    gone = ["000000003", "000100007"]
    r = cli_run("memory", "forget", "m", "--keys", _keys_file(tmp_path, *gone, "nowhere"), "--all-versions",
                "--reason", "licence withdrawn")
    assert "takedown #1 (all-versions) done: 3 keys, v1: 2, v2: 2; 2 cache(s) dropped" in r.output
    assert [c.exists() for c in caches] == [False, False, True]

    q = _vectors(corpora["base"])[3:4]
    q /= np.linalg.norm(q)
    with _runtime() as rt:
        for collection in ("reco-m-v1", "reco-m-v2"):
            assert not set(gone) & set(_store_keys(rt, collection))
            assert all(h.payload["key"] != "000000003" for h in rt.store.search(collection, q, "image", 30)[0])
        assert set(gone) <= set(_store_keys(rt, "reco-other-v1"))  # another memory keeps its items
    for n, count in ((1, 18), (2, 22)):
        verified = json.loads(cli_run("memory", "verify", "m", "--version", n, "--json").stdout)
        assert verified["ok"] and verified["store_count"] == verified["metadata_count"] == count
        assert _show(cli_run, "m", str(n))["items_forgotten"] == 2
    hits = json.loads(cli_run("memory", "query", "m", "--text", "x", "-k", "18", "--json").stdout)
    assert not {h["key"] for h in hits} & set(gone)

    cli_run("memory", "export", "m@1", tmp_path / "export")
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["count"] == 18
    import pyarrow.parquet as pq

    exported = [k for p in manifest["parts"] for k in pq.read_table(tmp_path / "export" / p["metadata"])["key"].to_pylist()]
    assert len(exported) == 18 and not set(exported) & set(gone)

    # a later build of the memory, from a source that still holds them, leaves them out
    r = cli_run("memory", "build", "m", corpora["base"], "--backbone", tiny_config)
    assert "18 items stored, 2 skipped (forgotten=2)" in r.output
    shown = _show(cli_run, "m")
    assert shown["takedowns"][0]["versions"] == {"1": 2, "2": 2} and shown["takedowns"][0]["status"] == "done"


def test_a_store_failure_mid_takedown_is_loud_and_resumes_to_exact_counts(cli_run, backend, corpora, tmp_path,
                                                                          tiny_config, monkeypatch):
    from app.errors import TransientError
    from app.store.edge import EdgeStore

    cli_run("memory", "build", "m", corpora["base"], "--backbone", tiny_config, "--activate")
    cli_run("memory", "build", "m", corpora["new"], "--from", "1")
    cli_run("memory", "build", "m", corpora["update"], "--from", "2")
    keys = _keys_file(tmp_path, "000000001", "000100002")
    store_cls = EdgeStore if backend == "embedded" else ServerStore
    real = store_cls.delete_keys
    calls = []

    def flaky(self, collection, keys, keep_version=None):
        calls.append(collection)
        if collection == "reco-m-v2" and len(calls) == 2:
            real(self, collection, keys[:1], keep_version)  # half of it lands, then the store goes away
            raise TransientError("Qdrant at http://q:6333 did not answer")
        return real(self, collection, keys, keep_version)

    monkeypatch.setattr(store_cls, "delete_keys", flaky)
    r = cli_run("memory", "forget", "m", "--keys", keys, "--all-versions", ok=False)
    assert r.exit_code == 1
    assert "takedown #1 of m stopped after 1 of 3 versions" in r.output and "forget m --resume" in r.output
    for n in (1, 2, 3):  # every version says so, not only the one that failed
        v = cli_run("memory", "verify", "m", "--version", n, ok=False)
        assert v.exit_code == 1 and "takedown #1 (2 keys) is failed" in v.output
    r = cli_run("memory", "export", "m@3", tmp_path / "export", ok=False)
    assert r.exit_code == 1 and "forget m --resume" in r.output
    r = cli_run("memory", "forget", "m", "--keys", keys, "--all-versions", ok=False)
    assert "not finished" in r.output  # no second takedown on top of a broken one

    r = cli_run("memory", "forget", "m", "--resume")
    assert "takedown #1 (all-versions) done: 2 keys, v1: 2, v2: 2, v3: 2" in r.output
    for n, count in ((1, 18), (2, 22), (3, 22)):
        verified = json.loads(cli_run("memory", "verify", "m", "--version", n, "--json").stdout)
        assert verified["ok"] and verified["store_count"] == count, verified


@pytest.mark.parametrize("case", ["remove_without_from", "other_backbone", "other_storage", "empty_keys",
                                  "parent_not_ready", "no_source", "forget_while_building", "nothing_to_resume"])
def test_bad_delta_and_takedown_input_stops_with_one_line(cli_run, rt, corpora, tmp_path, tiny_config, case):
    cli_run("memory", "build", "m", corpora["base"], "--backbone", tiny_config, "--activate")
    keys = _keys_file(tmp_path, "000000001")
    other = None
    if case == "other_backbone":  # the tiny config, one layer deeper: another backbone of the same width
        cfg = json.loads(open(tiny_config).read())
        cfg["text_cfg"]["layers"] += 1
        other = tmp_path / "other.json"
        other.write_text(json.dumps(cfg))
    if case == "forget_while_building":
        from app.build import start_build

        start_build(rt, "m", str(corpora["new"]), parent=1)
    args, expect = {
        "remove_without_from": (["memory", "build", "m", corpora["new"], "--backbone", tiny_config,
                                 "--remove-keys", keys], "give --from VERSION"),
        "other_backbone": (["memory", "build", "m", corpora["new"], "--from", "1", "--backbone", other],
                           "must use its parent's backbone"),
        "other_storage": (["memory", "build", "m", corpora["new"], "--from", "1", "--quantization", "binary"],
                          "a delta keeps its parent's storage"),
        "empty_keys": (["memory", "forget", "m", "--keys", _keys_file(tmp_path, "", " ", name="empty.txt")],
                       "holds no key"),
        "parent_not_ready": (["memory", "build", "m", corpora["new"], "--from", "7"], "has no version 7"),
        "no_source": (["memory", "build", "m", "--from", "1"], "give SOURCE"),
        "forget_while_building": (["memory", "forget", "m", "--keys", keys, "--all-versions"],
                                  "m v2 is still building"),
        "nothing_to_resume": (["memory", "forget", "m", "--resume"], "no unfinished takedown"),
    }[case]
    r = cli_run(*args, ok=False)
    assert r.exit_code in (1, 2), r.output
    assert expect in r.output
    versions = json.loads(cli_run("memory", "list", "--json").stdout)[0]["versions"]
    assert len(versions) == (2 if case == "forget_while_building" else 1)


def test_the_delta_benchmark_runs_at_toy_size(tmp_path, monkeypatch):
    """`benchmarks/delta.py` end to end on 6,000 + 500 items: the JSON the README quotes, with the lineage checked."""
    from benchmarks import delta

    for var in ("RECO_HOME", "RECO_DATABASE_URL", "RECO_QDRANT_URL", "RECO_BROKER_URL"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "delta.json"
    assert delta.main(["--n", "6000", "--delta", "500", "--remove", "50", "--queries", "10", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["headline"]["encoded_items"] == 500 and r["delta_build"]["items"] == 6450
    assert r["delta_build"]["lineage"] == {"parent": 1, "parent_items": 6000, "added": 500, "updated": 0,
                                          "removed": 50}
    assert 0 < r["headline"]["delta_vs_full_build"] and r["delta_build"]["recall_at_10"] > 0.9
