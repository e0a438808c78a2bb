"""`RecoEncoder.refine` at batch 256 over a 100k memory: the store's search (sealed: HNSW, int8 rescored) against
exact search on the device (app/device_search.py), side by side in one process, on the device torch picks.

    python benchmarks/device_search.py [--memory-size 100000] [--batch 256] [--repeats 7] [--device cpu|cuda]
                                       [--out benchmarks/results/device_search.json]

Memory: CLIP-like 512-d pairs (the clustered generator of benchmarks/search.py, as benchmarks/train.py), put into
an embedded store collection and sealed as a memory version is (auto storage: HNSW + int8 at this size). The
encoder is a RecoEncoder with a freshly built fusion module (k=10, uni search, cross fusion: only the shape
matters), refining with the collection named, so no metadata DB is involved. Queries: memory images + noise.
Modes alternate call by call; medians; the load of the device copy is timed once, apart. Also reported: how many
of the store's hits the exact search shares (the HNSW's recall@10 against exact).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log, machine, write_result  # noqa: E402


def build(store, name: str, n: int, dim: int, seed: int = 0) -> np.ndarray:
    from app.store.base import Storage, point_id
    from benchmarks.search import clustered

    gen = dict(clusters=min(1000, max(1, n // 100)), centre_rank=128, cluster_rank=48, mean_weight=0.5,
               spread=0.6, iso_noise=0.15)
    img = clustered(n, dim, seed=seed, **gen)
    txt = img + 0.7 * clustered(n, dim, seed=seed + 1, **gen)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    store.create(name, dim, Storage())
    for a in range(0, n, 2048):
        store.upsert(name, [point_id("bench", 1, str(i)) for i in range(a, min(n, a + 2048))], img[a:a + 2048],
                     txt[a:a + 2048], [{"key": str(i)} for i in range(a, min(n, a + 2048))])
    store.seal(name, Storage())
    return img


def main(argv=None) -> int:
    import torch

    from app import device_search
    from app.encoder import RecoEncoder
    from app.fusion import FusionConfig, build as build_fusion
    from app.retrieval import search_hits
    from app.runtime import Runtime
    from app.settings import Settings

    p = argparse.ArgumentParser()
    p.add_argument("--memory-size", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/device_search.json")
    args = p.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="reco-bench-ds-"))
    rt = Runtime(dataclasses.replace(Settings.from_env({"RECO_HOME": str(home)}), device_search="off"))
    name = "reco-bench-v1"
    t0 = time.perf_counter()
    img = build(rt.store, name, args.memory_size, args.dim)
    log(f"built and sealed {args.memory_size} pairs in {time.perf_counter() - t0:.0f}s: {rt.store.storage(name)}")
    k = 10
    info = {"name": "bench", "dim": args.dim, "backbone_hash": "-", "config": {"job": {"train": {
        "k": k, "search": "uni", "fusion": "cross"}}}}
    fusion = build_fusion(FusionConfig(dim=args.dim, k=k), 0).to(args.device).eval()
    enc = RecoEncoder(rt, info, fusion, None, "bench", 1, args.device)
    rng = np.random.default_rng(1)
    q = img[rng.choice(len(img), args.batch, replace=False)] + 0.05 * rng.standard_normal((args.batch, args.dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    on, off = (dataclasses.replace(rt.settings, device_search=m) for m in ("on", "off"))

    enc.refine(q, "image", collection=name)  # warm: the shard opened and held
    rt.settings = on
    t0 = time.perf_counter()
    enc.refine(q, "image", collection=name)
    load_s = time.perf_counter() - t0
    times = {"store": [], "device": []}
    split = {"store": [], "device": []}
    for _ in range(args.repeats):
        for mode, s in (("store", off), ("device", on)):
            rt.settings = s
            enc.timing.search = enc.timing.fuse = 0.0
            t0 = time.perf_counter()
            enc.refine(q, "image", collection=name)
            times[mode].append(time.perf_counter() - t0)
            split[mode].append(enc.timing.search)
    store_hits = search_hits(rt.store, name, q, "image", k, with_vectors=False)
    dev_hits = search_hits(rt.store, name, q, "image", k, with_vectors=False, device=args.device, settings=on)
    shared = np.mean([len({h.id for h in a} & {h.id for h in b}) / k for a, b in zip(store_hits, dev_hits)])
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {
        "benchmark": "device_search", "machine": machine(), "device": args.device, "memory_size": args.memory_size,
        "dim": args.dim, "batch": args.batch, "k": k, "repeats": args.repeats,
        "storage": rt.store.storage(name), "threads": torch.get_num_threads(),
        "refine_s": med, "search_s": {m: statistics.median(v) for m, v in split.items()},
        "items_per_s": {m: args.batch / v for m, v in med.items()},
        "device_over_store": med["store"] / med["device"], "device_load_s": load_s,
        "store_recall_at_10_vs_exact": float(shared),
    }
    log(f"refine batch {args.batch}: store {med['store'] * 1000:.0f} ms, device {med['device'] * 1000:.0f} ms "
        f"({result['device_over_store']:.2f}x); device copy loaded in {load_s:.1f}s; store recall@10 {shared:.4f}")
    write_result(args.out, result)
    enc.close()
    device_search.drop()
    rt.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
