"""Decoding for ingestion: the auto rules, and a pool of worker processes that gives exactly what inline gives
(same order, same pixels, same skip counts)."""

import io
import tarfile
from collections import Counter

import numpy as np
import pytest

from app import ingest, synthetic
from app.corpus import Item, SkipReason
from app.decode import DecodePool, decode_pool, decode_workers
from app.ingest import encode_batch
from app.settings import Settings

CORRUPT = b"\x89PNG\r\n\x1a\nnot really"


# -- the auto rules (pure functions: no hardware involved) ----------------------------------------------------------
def test_auto_decode_workers_inline_on_cpu_pool_on_an_accelerator():
    assert decode_workers(None, "cpu") == 0
    assert decode_workers(None, "cpu", cpus=64) == 0
    assert decode_workers(None, "cuda", cpus=8) == 7
    assert decode_workers(None, "cuda:1", cpus=64) == 16
    assert decode_workers(None, "cuda", cpus=1) == 0
    assert decode_workers(None, "cuda", cpus=2) == 1 and decode_workers(None, "mps", cpus=4) == 3
    assert decode_workers(3, "cpu") == 3 and decode_workers(0, "cuda", cpus=64) == 0  # a setting wins


def test_auto_encode_batch_by_device():
    assert encode_batch(None, "cpu") == 128 == ingest.BATCH_SIZE
    assert encode_batch(None, None) == 128  # embeddings: nothing is encoded
    assert encode_batch(None, "cuda") == 1024 and encode_batch(None, "cuda:0") == 1024
    assert encode_batch(64, "cuda") == 64 and encode_batch(512, "cpu") == 512


def test_settings_are_read_from_the_environment():
    s = Settings.from_env({"RECO_DECODE_WORKERS": "2", "RECO_ENCODE_BATCH": "512"})
    assert (s.decode_workers, s.encode_batch) == (2, 512)
    s = Settings.from_env({"RECO_DECODE_WORKERS": "0"})
    assert (s.decode_workers, s.encode_batch) == (0, None)
    s = Settings.from_env({})
    assert (s.decode_workers, s.encode_batch) == (None, None)


# -- the pool against inline ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool2(tiny_backbone):
    """Two worker processes, started once for the module (and reused by the ingest below: one pool per process)."""
    return decode_pool(tiny_backbone, 2)


def _items():
    """Good items with, in source order: a corrupt image mid-batch, a key repeated in its batch and in a later
    one, a corrupt first occurrence whose repeat is good (the repeat is stored), and reader-side skips."""
    good = synthetic.items(17)
    it = [Item(key=k, caption=c, image_bytes=png) for k, png, c in good]
    k = lambda i: good[i][0]  # noqa: E731
    return [
        *it[0:3],
        Item(key="bad", caption="a corrupt picture", image_bytes=CORRUPT),
        *it[3:5],
        Item(key=k(1), caption="a repeat in the batch", image_bytes=good[9][1]),
        *it[5:8],
        Item(key="late", caption="corrupt first", image_bytes=good[2][1][:300]),
        Item(key="nocap", skip=SkipReason.EMPTY_CAPTION),
        *it[8:12],
        Item(key="late", caption="good the second time", image_bytes=good[12][1]),
        Item(key=k(4), caption="a repeat across batches", image_bytes=good[13][1]),
        Item(key="trunc", caption="truncated", image_bytes=good[3][1][: len(good[3][1]) // 2]),
        *it[12:17],
    ]


def _run_prepared(backbone, pool, monkeypatch, batch_size=6):
    monkeypatch.setattr(ingest, "read_shard", lambda fmt, spec: iter(_items()))
    counts = Counter()
    out = list(ingest._prepared("wds", {}, backbone, counts, batch_size, pool))
    return out, counts


def test_pool_batches_equal_inline_exactly(tiny_backbone, pool2, monkeypatch):
    import torch

    inline, c_inline = _run_prepared(tiny_backbone, DecodePool(tiny_backbone.preprocess, tiny_backbone.tokenizer),
                                     monkeypatch)
    pooled, c_pooled = _run_prepared(tiny_backbone, pool2, monkeypatch)
    assert c_pooled == c_inline == {SkipReason.CORRUPT_IMAGE: 3, SkipReason.DUPLICATE_KEY: 2,
                                    SkipReason.EMPTY_CAPTION: 1}
    assert len(pooled) == len(inline)
    for (k1, cap1, _, px1, tok1), (k2, cap2, _, px2, tok2) in zip(inline, pooled):
        assert k1 == k2 and cap1 == cap2
        assert torch.equal(px1, px2) and torch.equal(tok1, tok2)
        assert len(px1) == len(tok1) == len(k1)
    keys = [k for b in pooled for k in b[0]]
    good = [k for k, _, _ in synthetic.items(17)]
    # source order, the corrupt and truncated items gone, their neighbours in place, "late" from its good repeat
    assert keys == good[:12] + ["late"] + good[12:]
    caps = dict(zip(keys, [c for b in pooled for c in b[1]]))
    assert caps["late"] == "good the second time" and caps[good[1]] != "a repeat in the batch"


def test_pixels_of_the_neighbours_of_a_corrupt_image_are_theirs(tiny_backbone, pool2, monkeypatch):
    """Each stored row holds the pixels of its own image, however many rows around it were dropped."""
    import torch
    from PIL import Image

    pooled, _ = _run_prepared(tiny_backbone, pool2, monkeypatch, batch_size=8)
    by_key = {k: png for k, png, _ in synthetic.items(17)}
    by_key["late"] = synthetic.items(17)[12][1]
    for keys, _, _, pixels, _ in pooled:
        want = tiny_backbone.preprocess_images([Image.open(io.BytesIO(by_key[k])).convert("RGB") for k in keys])
        assert torch.equal(pixels, want)


def test_a_batch_with_nothing_decodable_and_an_empty_one(tiny_backbone, pool2):
    p = pool2.submit([CORRUPT, b""], ["a", "b"]).result()
    assert p.ok == [False, False] and p.pixels is None and p.tokens.shape[0] == 2
    p = pool2.submit([], []).result()
    assert p.ok == [] and p.pixels is None and p.tokens is None


# -- end to end ----------------------------------------------------------------------------------------------------
def _shard_with_problems(root):
    root.mkdir(parents=True)
    good = synthetic.items(13, seed=3)
    with tarfile.open(root / "00000.tar", "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i, (key, png, cap) in enumerate(good):
            add(f"{key}.png", png)
            add(f"{key}.txt", cap.encode())
            if i == 6:
                add("corrupt.png", CORRUPT)
                add("corrupt.txt", b"a corrupt picture")
    return root


def _build(rt, name, source, tiny_config):
    from app.build import run_in_process, start_build
    from app.db.models import MemoryVersion

    v = start_build(rt, name, str(source), backbone=tiny_config)
    run_in_process(rt, v.id, show_progress=False)
    with rt.db.session() as s:
        row = s.get(MemoryVersion, v.id)
        stored, collection = row.items_stored, row.collection
        reasons = {}
        for sh in row.shards:
            reasons.update(sh.skip_reasons or {})
    vecs = {}
    for _ids, im, tx, payloads in rt.store.scan(collection):
        for p, a, b in zip(payloads, im, tx):
            vecs[p["key"]] = (a, b)
    return stored, reasons, vecs


def test_ingest_with_two_workers_stores_the_same_vectors_as_inline(reco_env, tmp_path, tiny_config, tiny_backbone,
                                                                   pool2, monkeypatch):
    from app.runtime import Runtime

    source = _shard_with_problems(tmp_path / "wds")
    results, used = {}, []
    real_pool = decode_pool

    def spy(backbone, workers):
        used.append(workers)
        return real_pool(backbone, workers)

    monkeypatch.setattr("app.decode.decode_pool", spy)
    sizes = []
    real_encode = tiny_backbone.encode_image_tensor
    monkeypatch.setattr(tiny_backbone, "encode_image_tensor", lambda px: sizes.append(len(px)) or real_encode(px))
    for workers in ("0", "2"):
        monkeypatch.setenv("RECO_DECODE_WORKERS", workers)
        monkeypatch.setenv("RECO_ENCODE_BATCH", "5")
        rt = Runtime(Settings.from_env())
        try:
            results[workers] = _build(rt, "mem", source, tiny_config)
        finally:
            rt.close()
    assert used == [0, 2]
    assert sizes == [5, 4, 4] * 2  # RECO_ENCODE_BATCH: 14 items read 5 at a time, the corrupt 8th dropped
    (n0, r0, v0), (n2, r2, v2) = results["0"], results["2"]
    assert n0 == n2 == 13 and r0 == r2 == {SkipReason.CORRUPT_IMAGE: 1}
    assert v0.keys() == v2.keys() == {k for k, _, _ in synthetic.items(13, seed=3)}
    for k in v0:
        np.testing.assert_array_equal(v0[k][0], v2[k][0])
        np.testing.assert_array_equal(v0[k][1], v2[k][1])
