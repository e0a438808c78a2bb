"""One contract, run unchanged against both store backends."""

import json
import threading
import time

import numpy as np
import pytest

from app.store import base
from app.store.base import Storage, point_id
from app.store.edge import EdgeStore
from app.store.server import ServerStore

DIM = 16


STORAGE = {"plain": Storage("none"), "auto": Storage("auto"), "int8": Storage("int8"), "binary": Storage("binary"),
           "int8-on-disk": Storage("int8", on_disk=True)}


@pytest.fixture(params=[(b, s) for b in ("embedded", "server") for s in STORAGE], ids=lambda p: "-".join(p))
def store(request, tmp_path):
    """Each backend with each storage option: every collection a test creates gets that option."""
    backend, option = request.param
    s = EdgeStore(tmp_path / "vectors") if backend == "embedded" else ServerStore(":memory:")
    create = s.create
    s.create = lambda collection, dim, storage=None, vectors=base.MODALITIES: create(
        collection, dim, storage or STORAGE[option], vectors)
    s.storage_option = STORAGE[option]
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


def test_a_class_set_collection_has_its_own_vector_names(store):
    """A class set's points carry `frozen` and `refined` vectors and no image/text: put, scan, search, seal."""
    ids, frozen, refined, _ = _data(40, seed=3)
    payloads = [{"key": f"Q{i}", "name": f"class {i}"} for i in range(40)]
    store.create("reco-c-v1", DIM, vectors=base.CLASS_VECTORS)
    store.put("reco-c-v1", ids, {"frozen": frozen, "refined": refined}, payloads)
    assert store.seal("reco-c-v1", store.storage_option) == 40
    got = {}
    for b_ids, vectors, b_pay in store.scan_vectors("reco-c-v1", ["refined"], batch=16):
        assert list(vectors) == ["refined"] and vectors["refined"].shape == (len(b_ids), DIM)
        got.update({pid: (vectors["refined"][j], b_pay[j]) for j, pid in enumerate(b_ids)})
    assert sorted(got) == sorted(ids)
    np.testing.assert_allclose(got[ids[7]][0], refined[7], atol=1e-5)
    assert got[ids[7]][1] == payloads[7]
    for using, x in (("frozen", frozen), ("refined", refined)):
        hits = store.search("reco-c-v1", x[:5], using=using, k=3)
        assert [h[0].id for h in hits] == ids[:5] and hits[0][0].payload["key"] == "Q0"
    assert store.storage("reco-c-v1")["quantization"] in ("none", "int8", "binary")
    with pytest.raises(Exception):
        store.search("reco-c-v1", frozen[:1], using="image", k=3)  # not one of this collection's vectors


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
    by_id = {pid: j for j, pid in enumerate(ids)}
    for i, row in enumerate(hits):
        # quantized candidates are rescored with the original vectors: the scores are exact cosines
        np.testing.assert_allclose([h.score for h in row], [float(q[i] @ txt[by_id[h.id]]) for h in row], atol=1e-4)
        assert row[0].vector is None
    found = np.mean([len({h.id for h in row} & {ids[j] for j in ex}) / 5 for row, ex in zip(hits, exact)])
    if store.storage_option.quantization == "binary":  # 1 bit per dimension of 16: coarse (512-d: see below)
        assert found >= 0.6, found
    else:
        assert [[h.id for h in row] for row in hits] == [[ids[j] for j in ex] for ex in exact]


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


@pytest.mark.parametrize("backend", ["embedded", "server"])
@pytest.mark.parametrize("quantization", ["int8", "binary"])
def test_quantized_search_keeps_recall_on_clip_like_vectors(tmp_path, backend, quantization):
    """384-d clustered vectors (as CLIP's are), past the full-scan threshold so the graph is used: with the default
    oversampling, recall@10 against exact search stays >= 0.95 and scores are the original cosines."""
    rng = np.random.default_rng(1)
    dim, n = 384, 7000
    centres = rng.standard_normal((70, dim)).astype(np.float32)
    x = centres[rng.integers(0, 70, n)] + 0.9 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = centres[rng.integers(0, 70, 50)] + 0.9 * rng.standard_normal((50, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    s = EdgeStore(tmp_path / "v") if backend == "embedded" else ServerStore(":memory:")
    ids = [point_id("m", 1, f"k{i}") for i in range(n)]
    s.create("reco-q-v1", dim, Storage(quantization))
    s.upsert("reco-q-v1", ids, x, x, [{"key": f"k{i}"} for i in range(n)])
    s.seal("reco-q-v1")
    assert s.storage("reco-q-v1")["quantization"] == quantization
    hits = s.search("reco-q-v1", q, using="image", k=10)
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    recall = np.mean([len({h.id for h in row} & {ids[j] for j in ex}) / 10 for row, ex in zip(hits, exact)])
    assert recall >= 0.95, recall
    j = {pid: i for i, pid in enumerate(ids)}
    np.testing.assert_allclose([h.score for h in hits[0]], [float(q[0] @ x[j[h.id]]) for h in hits[0]], atol=1e-4)
    s.close()


def test_storage_is_recorded_by_the_store_and_auto_quantizes_only_what_gets_a_graph(store, monkeypatch):
    name, *_ = _filled(store, n=300)
    store.seal(name, store.storage_option)
    applied = store.storage(name)
    option = store.storage_option
    assert applied["on_disk"] == option.on_disk
    assert applied["quantization"] == ("none" if option.quantization == "auto" else option.quantization)
    monkeypatch.setattr(base, "FULL_SCAN_THRESHOLD_KB", 1)  # 300 x 16-d = 19 KB per vector: a graph now
    big, *_ = _filled(store, n=300, name="reco-m-v2")
    store.seal(big, store.storage_option)
    assert store.storage(big)["quantization"] == ("int8" if option.quantization == "auto" else
                                                  store.storage_option.at_create())


class _Overlap:
    """Wraps the engine's batch query with a 0.2 s sleep that lets go of the GIL (as a server's network call
    does) and counts how many calls are inside it at once."""

    def __init__(self):
        self.inside = self.most = 0
        self.lock = threading.Lock()

    def wrap(self, fn):
        def slow(*a, **k):
            with self.lock:
                self.inside += 1
                self.most = max(self.most, self.inside)
            try:
                time.sleep(0.2)
                return fn(*a, **k)
            finally:
                with self.lock:
                    self.inside -= 1
        return slow


def _instrument(store, monkeypatch) -> _Overlap:
    from contextlib import contextmanager

    probe = _Overlap()
    if isinstance(store, ServerStore):
        monkeypatch.setattr(store.client, "query_batch_points", probe.wrap(store.client.query_batch_points))
        return probe
    opened = store._open

    class Shard:
        def __init__(self, shard):
            self.shard = shard

        def __getattr__(self, name):
            return probe.wrap(self.shard.query_batch) if name == "query_batch" else getattr(self.shard, name)

    @contextmanager
    def open_(collection, *a, **k):
        with opened(collection, *a, **k) as shard:
            yield Shard(shard)

    monkeypatch.setattr(store, "_open", open_)
    return probe


def test_concurrent_searches_on_one_open_version_run_at_the_same_time(store, monkeypatch):
    """No lock of ours is held across a search: threads searching one open version are inside the engine at the
    same time, and one long batch is split across the store's search threads. (qdrant-edge 0.9 itself holds the
    GIL for a whole query, so on the embedded engine the calls take turns inside; a server's do not.)"""
    name, ids, img, txt = _filled(store, n=50)
    store.seal(name)
    probe = _instrument(store, monkeypatch)
    with store.hold(name):
        threads = [threading.Thread(target=store.search, args=(name, img[:5], "image", 3)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert probe.most == 4
    probe.most = 0
    store.search_threads = 3
    q = np.repeat(img, 12, axis=0)  # 600 queries: over SPLIT_AT
    hits = store.search(name, q, using="image", k=1)
    assert probe.most == 3 and [row[0].id for row in hits] == [ids[i % 50] for i in np.repeat(np.arange(50), 12)]


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

    monkeypatch.setattr(base, "FULL_SCAN_THRESHOLD_KB", 1)  # 300 x 16-d floats = 19 KB per vector: over it
    store = EdgeStore(tmp_path / "large")
    name, ids, img, txt = _filled(store, n=300)
    assert store.seal(name) == 300
    assert _graph_degrees(tmp_path / "large") == {edge.HNSW_M}
    hits = store.search(name, img, using="image", k=1)  # through the graph
    assert np.mean([row[0].id == ids[i] for i, row in enumerate(hits)]) >= 0.99


def _versioned(store, name="reco-m-v1", n=30, version=1, seed=0):
    ids, img, txt, payloads = _data(n, seed)
    store.create(name, DIM)
    store.upsert(name, ids, img, txt, [{**p, "version": version} for p in payloads])
    return ids, img, txt


def test_keys_are_counted_and_deleted_by_payload_even_in_a_sealed_collection(store):
    """A takedown deletes by key (whatever version wrote the point's id), in a sealed collection too; deleting
    again deletes nothing; `keep_version` spares the points a given version wrote."""
    ids, img, _ = _versioned(store)
    store.seal("reco-m-v1")
    gone = ["k3", "k7", "absent"]
    assert store.count_keys("reco-m-v1", gone) == 2
    assert store.delete_keys("reco-m-v1", gone) == 2
    assert store.delete_keys("reco-m-v1", gone) == 0
    assert store.count("reco-m-v1") == 28
    keys = {p["key"] for _i, _v, ps in store.scan_vectors("reco-m-v1", ["image"]) for p in ps}
    assert "k3" not in keys and "k7" not in keys and len(keys) == 28
    hits = store.search("reco-m-v1", img[3], "image", 5)[0]
    assert ids[3] not in {h.id for h in hits}
    store.put("reco-m-v1", [point_id("m", 2, "k1")], {"image": img[:1], "text": img[:1]},
              [{"key": "k1", "caption": "new", "version": 2}])
    assert store.keys_of_version("reco-m-v1", 2) == ["k1"]
    assert store.count_keys("reco-m-v1", ["k1"]) == 2
    assert store.delete_keys("reco-m-v1", ["k1"], keep_version=2) == 1  # the older copy goes, the update stays
    assert [h.payload["caption"] for h in store.retrieve("reco-m-v1", [point_id("m", 2, "k1")])] == ["new"]


def test_copy_holds_the_source_minus_excluded_keys_with_its_storage(store):
    ids, img, _ = _versioned(store)
    store.seal("reco-m-v1")
    assert store.copy("reco-m-v1", "reco-m-v2", exclude_keys=["k0", "k1"]) == 28
    assert store.storage("reco-m-v2") == store.storage("reco-m-v1")
    assert store.dim("reco-m-v2") == DIM and sorted(store.vector_names("reco-m-v2")) == ["image", "text"]
    assert store.count("reco-m-v1") == 30  # the source is untouched
    got = store.retrieve("reco-m-v2", ids[2:4], with_vector="image")
    assert [h.id for h in got] == ids[2:4] and np.allclose(got[0].vector, img[2], atol=1e-5)
    assert store.retrieve("reco-m-v2", ids[:2]) == []
    # a copy into a target that exists already (a rerun) stores each point once
    assert store.copy("reco-m-v1", "reco-m-v2", exclude_keys=["k0", "k1"]) == 28
    assert store.seal("reco-m-v2") == 28
