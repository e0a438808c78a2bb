"""One contract, run unchanged against both store backends."""

import json
import threading

import numpy as np
import pytest

from app.store.base import point_id
from app.store.edge import EdgeStore
from app.store.server import ServerStore

DIM = 16


@pytest.fixture(params=["embedded", "server"])
def store(request, tmp_path):
    s = EdgeStore(tmp_path / "vectors") if request.param == "embedded" else ServerStore(":memory:")
    yield s
    s.close()


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, DIM)).astype(np.float32)
    txt = rng.standard_normal((n, DIM)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    ids = [point_id("m", 1, f"k{i}") for i in range(n)]
    payloads = [{"key": f"k{i}", "caption": f"caption {i}", "shard": i % 3} for i in range(n)]
    return ids, img, txt, payloads


def _filled(store, n=60, name="reco-m-v1"):
    ids, img, txt, payloads = _data(n)
    store.create(name, DIM)
    store.upsert(name, ids, img, txt, payloads)
    return name, ids, img, txt


def test_create_is_idempotent_and_exists(store):
    assert not store.exists("reco-m-v1")
    store.create("reco-m-v1", DIM)
    store.create("reco-m-v1", DIM)
    assert store.exists("reco-m-v1")
    assert store.count("reco-m-v1") == 0


def test_upsert_twice_stores_each_point_once(store):
    name, ids, img, txt = _filled(store)
    _, _, _, payloads = _data(60)
    store.upsert(name, ids[:20], img[:20], txt[:20], payloads[:20])
    assert store.count(name) == 60
    assert sorted(i for b in store.iter_ids(name, batch=7) for i in b) == sorted(ids)


def test_scan_returns_every_point_with_both_vectors(store):
    name, ids, img, txt = _filled(store, n=25)
    seen = {}
    for b_ids, b_img, b_txt, b_pay in store.scan(name, batch=7):
        assert b_img.dtype == np.float32 and b_img.shape == (len(b_ids), DIM) == b_txt.shape
        for j, pid in enumerate(b_ids):
            seen[pid] = (b_img[j], b_txt[j], b_pay[j])
    assert sorted(seen) == sorted(ids)
    for i, pid in enumerate(ids):
        np.testing.assert_allclose(seen[pid][0], img[i], atol=1e-5)
        np.testing.assert_allclose(seen[pid][1], txt[i], atol=1e-5)
        assert seen[pid][2]["key"] == f"k{i}"


def test_search_is_exact_on_self_and_returns_other_modality(store):
    name, ids, img, txt = _filled(store)
    store.seal(name)
    hits = store.search(name, img[:5], using="image", k=3, with_vector="text")
    assert len(hits) == 5
    for i, row in enumerate(hits):
        assert len(row) == 3
        assert row[0].id == ids[i]
        assert row[0].score == pytest.approx(1.0, abs=1e-4)
        assert row[0].payload["key"] == f"k{i}"
        assert row[0].payload["caption"] == f"caption {i}"
        np.testing.assert_allclose(row[0].vector, txt[i], atol=1e-5)
        scores = [h.score for h in row]
        assert scores == sorted(scores, reverse=True)


def test_search_matches_exact_ranking(store):
    name, ids, img, txt = _filled(store, n=200)
    assert store.seal(name) == 200  # the count the finaliser reconciles against the shards
    q = np.random.default_rng(5).standard_normal((10, DIM)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    hits = store.search(name, q, using="text", k=5)
    exact = np.argsort(-(q @ txt.T), axis=1)[:, :5]
    for row, ex in zip(hits, exact):
        assert [h.id for h in row] == [ids[j] for j in ex]
        assert row[0].vector is None


def test_search_excludes_ids_per_query(store):
    name, ids, img, txt = _filled(store)
    hits = store.search(name, img[:3], using="image", k=2, exclude=[{ids[0]}, set(), {ids[2], ids[5]}])
    assert ids[0] not in [h.id for h in hits[0]]
    assert hits[1][0].id == ids[1]
    assert not {ids[2], ids[5]} & {h.id for h in hits[2]}


def test_score_threshold_and_k_larger_than_collection(store):
    name, ids, img, txt = _filled(store, n=10)
    hits = store.search(name, img[:1], using="image", k=50)
    assert len(hits[0]) == 10
    hits = store.search(name, img[:1], using="image", k=50, score_threshold=0.999)
    assert [h.id for h in hits[0]] == [ids[0]]


def test_retrieve_in_given_order_skips_missing(store):
    name, ids, img, txt = _filled(store, n=10)
    missing = point_id("m", 1, "nope")
    got = store.retrieve(name, [ids[3], missing, ids[1]], with_vector="image")
    assert [h.id for h in got] == [ids[3], ids[1]]
    np.testing.assert_allclose(got[0].vector, img[3], atol=1e-5)
    assert got[1].payload["caption"] == "caption 1"


def test_bad_vector_name_is_refused(store):
    name, *_ = _filled(store, n=3)
    with pytest.raises(ValueError):
        store.search(name, np.ones((1, DIM), np.float32), using="audio", k=1)


def test_drop(store):
    name, *_ = _filled(store, n=3)
    store.drop(name)
    assert not store.exists(name)


def test_concurrent_readers_share_the_collection(store):
    name, ids, img, txt = _filled(store, n=50)
    store.seal(name)
    errors = []

    def reader(offset):
        try:
            for j in range(10):
                row = store.search(name, img[(offset + j) % 50], using="image", k=1)[0]
                assert row[0].id == ids[(offset + j) % 50]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i * 7,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_hold_with_create_dim_creates_then_keeps_open(store):
    ids, img, txt, payloads = _data(20)
    with store.hold("reco-h-v1", create_dim=DIM):
        store.upsert("reco-h-v1", ids, img, txt, payloads)
        store.upsert("reco-h-v1", ids, img, txt, payloads)
    with store.hold("reco-h-v1", create_dim=DIM):  # a rerun task: the collection exists, nothing is lost
        pass
    assert store.count("reco-h-v1") == 20


# -- embedded engine only ------------------------------------------------------------------------------------
def _graph_degrees(root):
    """The HNSW `m` of every sealed vector index under root (0: indexed segment without graph links)."""
    return {json.loads(p.read_text())["m"] for p in root.rglob("hnsw_config.json")}


def test_embedded_seal_builds_a_graph_only_where_search_consults_one(tmp_path, monkeypatch):
    """Under the full-scan threshold search is exact and the graph would go unused, so sealing builds none."""
    import app.store.edge as edge

    store = EdgeStore(tmp_path / "small")
    name, ids, img, txt = _filled(store, n=300)
    assert store.seal(name) == 300
    assert _graph_degrees(tmp_path / "small") == {0}
    hits = store.search(name, img, using="image", k=1)
    assert [row[0].id for row in hits] == ids

    monkeypatch.setattr(edge, "FULL_SCAN_THRESHOLD_KB", 1)  # 300 x 16-d floats = 19 KB per vector: over it
    store = EdgeStore(tmp_path / "large")
    name, ids, img, txt = _filled(store, n=300)
    assert store.seal(name) == 300
    assert _graph_degrees(tmp_path / "large") == {edge.HNSW_M}
    hits = store.search(name, img, using="image", k=1)  # through the graph
    assert np.mean([row[0].id == ids[i] for i, row in enumerate(hits)]) >= 0.99
