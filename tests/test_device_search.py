"""Search on the device (app/device_search.py) answers what the store's exact search answers, on both backends.

The store's search is exact here: every collection is under the full-scan threshold (a quantized one rescores
with the originals). Equal scores come in point-id order on both paths: the stores leave their order unspecified,
so `search_hits` sorts each store row that way (asking again where a run of equal scores reaches past the hits
fetched), and the device index breaks them the same way.
"""

import dataclasses

import numpy as np
import pytest

from app import device_search
from app.device_search import DeviceIndex, index_for, use_device_search
from app.retrieval import retrieve, search_hits
from app.settings import Settings
from app.store.base import Storage, point_id
from app.store.edge import EdgeStore
from app.store.server import ServerStore

DIM = 16
ON = dataclasses.replace(Settings.from_env({}), device_search="on")
OFF = dataclasses.replace(ON, device_search="off")
AUTO = dataclasses.replace(ON, device_search="auto")


@pytest.fixture(params=[("embedded", "none"), ("server", "none"), ("embedded", "int8"), ("server", "int8")],
                ids=lambda p: "-".join(p))
def store(request, tmp_path):
    backend, quantization = request.param
    s = EdgeStore(tmp_path / "vectors") if backend == "embedded" else ServerStore(":memory:")
    s.quantization = quantization
    yield s
    device_search.drop(s)
    s.close()


def _unit(rng, n):
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _fill(store, n=300, seed=0, name="reco-m-v1", dup_of=None, dups=()):
    """n points inserted in a shuffled order over several upserts; rows in `dups` copy row `dup_of` (both
    vectors), so their scores tie exactly."""
    rng = np.random.default_rng(seed)
    img, txt = _unit(rng, n), _unit(rng, n)
    for i in dups:
        img[i], txt[i] = img[dup_of], txt[dup_of]
    ids = [point_id("m", 1, f"{name}-k{i}") for i in range(n)]
    store.create(name, DIM, Storage(store.quantization))
    order = rng.permutation(n)
    for a in range(0, n, 97):
        sel = order[a:a + 97]
        store.upsert(name, [ids[i] for i in sel], img[sel], txt[sel], [{"key": f"k{i}"} for i in sel])
    store.seal(name, Storage(store.quantization))
    return name, ids, img, txt


def _assert_same(dev, ref):
    """Same hits: the same ids in the same order (equal scores in id order), scores to 1e-3, fused vectors equal."""
    assert len(dev) == len(ref)
    for i, (d, r) in enumerate(zip(dev, ref)):
        assert [h.id for h in d] == [h.id for h in r], i
        np.testing.assert_allclose([h.score for h in d], [h.score for h in r], atol=1e-3)
        for a, b in zip(d, r):
            if b.vector is not None:
                np.testing.assert_allclose(a.vector, b.vector, atol=1e-6)


def _both(store, name, q, side, k, **kw):
    ref = search_hits(store, name, q, side, k, **kw)
    dev = search_hits(store, name, q, side, k, device="cpu", settings=ON, **kw)
    return dev, ref


@pytest.mark.parametrize("side", ["image", "text"])
@pytest.mark.parametrize("search", ["uni", "cross"])
def test_random_data_matches_the_store(store, side, search):
    name, ids, img, txt = _fill(store)
    q = np.concatenate([_unit(np.random.default_rng(7), 20), img[:5] + 0.05, txt[:5]])
    _assert_same(*_both(store, name, q, side, 10, search=search))
    _assert_same(*_both(store, name, q, side, 10, search=search, with_vectors=False))


def test_planted_ties_come_in_id_order(store):
    dups = [3, 50, 7, 120, 99, 180, 11]  # seven copies of point 3
    name, ids, img, _ = _fill(store, dup_of=3, dups=dups)
    q = img[[3, 3, 10]] + np.float32(0.01)
    for k in (10, 7, 5, 3):  # the tied run inside k, exactly k, straddling k
        dev, ref = _both(store, name, q, "image", k)
        _assert_same(dev, ref)
        assert [h.id for h in dev[0][:min(k, 7)]] == sorted(ids[i] for i in dups)[:min(k, 7)]


def test_exclude_sets(store):
    name, ids, img, _ = _fill(store)
    q = img[:30]
    exclude = [{ids[i], ids[(i * 7) % 300], point_id("other", 1, "x")} for i in range(30)]
    exclude[3] = set()
    dev, ref = _both(store, name, q, "image", 10, exclude=exclude)
    _assert_same(dev, ref)
    assert all(h.id not in exclude[i] for i, row in enumerate(dev) for h in row)


def test_dedup_and_score_thresholds(store):
    name, ids, img, txt = _fill(store)
    q = np.concatenate([img[:20], img[20:40] + 0.02])  # self-matches score 1: the near-duplicates to drop
    for kw in ({"dedup_threshold": 0.99}, {"score_threshold": 0.3}, {"dedup_threshold": 0.95, "score_threshold": 0.2},
               {"score_threshold": 0.99}):
        dev, ref = _both(store, name, q, "image", 10, **kw)
        _assert_same(dev, ref)
    dev, _ = _both(store, name, q, "image", 10, score_threshold=0.3)
    assert min(h.score for row in dev for h in row) > 0.3


def test_k_larger_than_the_memory(store):
    name, ids, img, _ = _fill(store, n=12)
    dev, ref = _both(store, name, img[:4], "text", 20, exclude=[{ids[0]}] * 4)
    _assert_same(dev, ref)
    assert [len(r) for r in dev] == [11] * 4
    a = retrieve(store, name, img[:4], "text", 20, dim=DIM)
    b = retrieve(store, name, img[:4], "text", 20, dim=DIM, device="cpu", settings=ON)
    assert b.vectors.shape == a.vectors.shape == (4, 20, DIM) and b.mask.sum() == a.mask.sum() == 48
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_retrieve_fills_the_same_neighbours(store):
    name, ids, img, txt = _fill(store)
    q = _unit(np.random.default_rng(3), 17)
    a = retrieve(store, name, q, "image", 8, dim=DIM, score_threshold=0.2)
    b = retrieve(store, name, q, "image", 8, dim=DIM, score_threshold=0.2, device="cpu", settings=ON)
    assert a.ids == b.ids
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)


def test_loaded_once_per_version_and_dropped_on_a_new_version(tmp_path):
    store = EdgeStore(tmp_path / "vectors")
    store.quantization = "none"
    scans = []
    scan = store.scan_vectors
    store.scan_vectors = lambda collection, names, batch=1024: scans.append((collection, tuple(names))) or scan(
        collection, names, batch)
    v1, _, img1, _ = _fill(store, name="reco-m-v1", seed=1)
    v2, _, img2, _ = _fill(store, name="reco-m-v2", seed=2)
    for _ in range(3):
        search_hits(store, v1, img1[:4], "image", 5, device="cpu", settings=ON)
        search_hits(store, v1, img1[:4], "text", 5, device="cpu", settings=ON)
    assert scans == [(v1, ("image", "text"))]  # both names in one scan, once
    hits = search_hits(store, v2, img1[:4], "image", 5, device="cpu", settings=ON)
    assert list(device_search.cached(store)) == [v2]  # the other version of the memory went
    assert scans[1:] == [(v2, ("image", "text"))]
    _assert_same(hits, search_hits(store, v2, img1[:4], "image", 5))
    device_search.drop(store, v2)
    assert device_search.cached(store) == {}
    store.close()


def test_off_and_auto_on_a_cpu_ask_the_store(tmp_path):
    store = EdgeStore(tmp_path / "vectors")
    store.quantization = "none"
    name, *_ = _fill(store, n=20)
    assert index_for(store, name, "cpu", OFF, DIM, ("image",)) is None
    assert index_for(store, name, "cpu", AUTO, DIM, ("image",)) is None
    assert index_for(store, name, None, ON, DIM, ("image",)) is None
    assert isinstance(index_for(store, name, "cpu", ON, DIM, ("image",)), DeviceIndex)
    device_search.drop(store)
    store.close()


def test_use_device_search_rules(monkeypatch):
    assert use_device_search(AUTO, "cpu", 1000, 512) is False
    assert use_device_search(ON, "cpu", 10**9, 512) is True
    assert use_device_search(OFF, "cuda", 10, 512) is False
    monkeypatch.setattr(device_search, "_free_bytes", lambda device: 80 << 30)
    assert use_device_search(AUTO, "cuda", 1_000_000, 512) is True  # 6 GB + the 1 GiB buffer in 80 GB
    assert use_device_search(AUTO, "cuda:0", 100_000_000, 512) is False  # 600 GB
    monkeypatch.setattr(device_search, "_free_bytes", lambda device: 1 << 30)
    assert use_device_search(AUTO, "cuda", 1000, 512) is False  # the score buffer alone does not fit


def test_where_searches_run(tmp_path, monkeypatch):
    store = EdgeStore(tmp_path / "vectors")
    assert device_search.where(ON, "cpu", store, "reco-x-v1", 1000, 512) == "device (cpu, exact)"
    assert device_search.where(OFF, "cuda", store, "reco-x-v1", 1000, 512) == "store (exact)"
    assert device_search.where(AUTO, "cpu", store, "reco-x-v1", 1_000_000, 512) == "store (hnsw)"
    monkeypatch.setattr(device_search, "_free_bytes", lambda device: 80 << 30)
    assert device_search.where(AUTO, "cuda", store, "reco-x-v1", 1_000_000, 512) == "device (cuda, exact)"
    assert device_search.where(OFF, "cpu", ServerStore(":memory:"), "reco-x-v1", 10**6, 512) == "store (exact)"


def test_reco_encoder_refines_the_same_on_the_device(trained, rt, tmp_path, tiny_config, cli_run, monkeypatch):
    from app import synthetic
    from app.build import build_in_process
    from app.encoder import RecoEncoder
    from app.memory import activate

    enc = RecoEncoder.load("m", runtime=rt, load_backbone=False)
    q = _unit(np.random.default_rng(5), 40)
    q = np.pad(q, ((0, 0), (0, enc.info["dim"] - DIM)))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    on, off = (dataclasses.replace(rt.settings, device_search=mode) for mode in ("on", "off"))
    scans = []
    scan = rt.store.scan_vectors
    monkeypatch.setattr(rt.store, "scan_vectors", lambda c, names, batch=1024: scans.append(c) or scan(c, names, batch))

    def both(side):
        rt.settings = off
        ref = enc.refine(q, side)
        rt.settings = on
        return enc.refine(q, side), ref

    for _ in range(2):  # both sides; the memory's 256 captions are 32 distinct texts, so every text hit ties
        for side in ("image", "text"):  # with 7 others: equal scores come in id order on both paths
            dev, ref = both(side)
            np.testing.assert_allclose(dev, ref, atol=1e-5)
    c = enc._collection()
    a = retrieve(rt.store, c, q, "text", enc.k, dim=enc.info["dim"])
    b = retrieve(rt.store, c, q, "text", enc.k, dim=enc.info["dim"], device="cpu", settings=on)
    assert a.ids == b.ids and (a.scores[:, 0] == a.scores[:, 1]).all()  # ties are there, and agree
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    rt.settings = on
    enc.refine(q, "text")
    v1 = enc._collection()
    assert scans == [v1] and list(device_search.cached(rt.store)) == [v1]
    assert enc.search_runs() == "device (cpu, exact)"
    shown = cli_run("memory", "show", "mem", "--json")
    assert '"search_runs": "store (exact)"' in shown.output  # the CLI's settings: auto, on a CPU

    synthetic.write_wds(tmp_path / "mem2", 2, 32, seed=9)
    build_in_process(rt, "mem", tmp_path / "mem2", backbone=tiny_config)
    activate(rt, "mem", 2)
    dev, ref = both("image")
    np.testing.assert_allclose(dev, ref, atol=1e-5)
    v2 = enc._collection()
    assert v2 != v1 and scans == [v1, v2] and list(device_search.cached(rt.store)) == [v2]
    enc.close()
    assert device_search.cached(rt.store) == {}


def test_training_pulls_the_same_neighbours_on_the_device(trained, rt, tmp_path):
    """Training's neighbour pull (self-excluded, near-duplicates dropped) gives the same cached neighbours from the
    device index as from the store."""
    from app.db.models import FusionModel
    from app.train import NeighbourCache, TrainConfig, load_pairs

    with rt.db.session() as s:
        job = s.query(FusionModel).filter_by(name="m").one().config["job"]
    cfg = TrainConfig(**job["train"])
    pairs = load_pairs(rt, job["pairs"][2], job["pairs"][3])
    got = {}
    for mode in ("off", "on"):
        rt.settings = dataclasses.replace(rt.settings, device_search=mode, home=tmp_path / mode)
        cache = NeighbourCache(rt, job, cfg, pairs.image.shape[1], device="cpu")
        got[mode] = cache.get(pairs)
        assert cache.store_queries > 0  # pulled now, not read from an earlier cache
    assert list(device_search.cached(rt.store)) == [job["memory"][2]]
    for side in ("image", "text"):
        a, b = got["off"][side], got["on"][side]
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.idx, b.idx)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
        np.testing.assert_allclose(a.table, b.table, atol=1e-6)
    device_search.drop(rt.store)


def test_a_takedown_in_place_reaches_a_loaded_device_index(store, monkeypatch):
    """Points deleted from the sealed version (`reco memory forget --all-versions`, maybe in another process)
    leave the device copy at its next size check: the forgotten point is never answered again."""
    name, ids, img, _ = _fill(store, n=50)
    index = index_for(store, name, "cpu", ON, DIM, ("image",))
    assert index.n == 50
    assert store.delete_keys(name, ["k3"]) == 1
    monkeypatch.setattr(device_search, "RECHECK_S", 0.0)
    hits = search_hits(store, name, img[3:4], "image", 5, device="cpu", settings=ON)[0]
    assert ids[3] not in {h.id for h in hits}
    assert index_for(store, name, "cpu", ON, DIM, ("image",)).n == 49
