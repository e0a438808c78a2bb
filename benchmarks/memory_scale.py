"""Memories at scale: build, seal, disk, RAM and search speed of 100k, 300k and 1M-item versions (512-d, both
named vectors) for each storage option, against exact torch kNN and faiss HNSW (m 16) on the same data, one run.

    python benchmarks/memory_scale.py [--sizes 100000,300000,1000000] [--queries 1000]
                                      [--out benchmarks/results/memory_scale.json]

Data: the clustered generator of benchmarks/search.py with the settings benchmarks/train.py uses (CLIP-like image
vectors, text vectors correlated with them), written in clip-retrieval's layout and built through the product
(`start_build` + `run_in_process`, format `embeddings`, backbone spec ViT-B-32: no image is encoded). Queries are
held-out draws from the same distribution; ground truth is exact kNN over the vectors the store holds (recall@10
of the `image` vector).

Every measurement runs in a subprocess of its own, so its peak RSS (ru_maxrss) is its own: `build` (ingest +
seal of one version), `search` (open the version, batch 1 and batch 100 queries, an ef sweep), `exact` (torch
matmul + topk over the image matrix), `faiss` (IndexHNSWFlat, m 16, efConstruction 128, built with every core,
searched with one thread as the embedded engine searches one sealed segment with one). Options per size come
from --options (default: every option at 100k; none and int8+on-disk at 300k; int8+on-disk at 1M).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RECO_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

K, DIM, SPEC, PER_PART = 10, 512, "ViT-B-32", 100_000
OPTIONS = {"none": ("none", False), "int8": ("int8", False), "binary": ("binary", False),
           "int8-on-disk": ("int8", True)}
DEFAULT_OPTIONS = {100_000: list(OPTIONS), 300_000: ["none", "int8-on-disk"], 1_000_000: ["int8-on-disk"]}
EFS = (16, 32, 64, 128, 256)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KB on Linux


def stage(name: str, script: str = __file__, **kw) -> dict:
    """Run one stage of `script` (this one by default) in a fresh process; its last stdout line is its JSON
    result."""
    cmd = [sys.executable, script, "--stage", name, "--args", json.dumps(kw)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- stages (subprocesses) ----------------------------------------------------------------------------------------
def read_image_matrix(src: str) -> np.ndarray:
    """The image vectors as the store holds them: the parts' float16, as float32, unit length."""
    parts = sorted(Path(src, "img_emb").glob("img_emb_*.npy"), key=lambda p: int(p.stem.split("_")[-1]))
    x = np.concatenate([np.load(p).astype(np.float32) for p in parts])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def stage_data(n: int, queries: int, src: str, seed: int) -> dict:
    from benchmarks.search import clustered
    from benchmarks.train import write_embeddings

    t0 = time.perf_counter()
    write_embeddings(Path(src), n, DIM, "clustered", seed, per_part=PER_PART)
    gen = dict(clusters=min(1000, max(1, n // 100)), centre_rank=128, cluster_rank=48, mean_weight=0.5,
               spread=0.6, iso_noise=0.15)
    # held-out queries: the same generator and seed, drawn past the memory's rows
    q = clustered(n + queries, DIM, seed=seed, **gen)[n:]
    np.save(Path(src) / "queries.npy", q.astype(np.float32))
    return {"write_s": time.perf_counter() - t0, "peak_rss_gb": peak_rss_gb()}


def stage_exact(src: str, repeats: int) -> dict:
    import torch

    x = torch.from_numpy(read_image_matrix(src))
    q = torch.from_numpy(np.load(Path(src) / "queries.npy"))
    truth = torch.topk(q @ x.T, K, dim=1).indices.numpy()
    np.save(Path(src) / "truth.npy", truth)
    out = {}
    for bs, nq in ((1, 100), (100, len(q))):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for a in range(0, nq, bs):
                torch.topk(q[a:a + bs] @ x.T, K, dim=1)
            best = min(best, time.perf_counter() - t0)
        out[f"qps_batch{bs}"] = nq / best
    return {**out, "peak_rss_gb": peak_rss_gb(), "torch_threads": torch.get_num_threads()}


def stage_faiss(src: str, repeats: int) -> dict:
    import faiss

    x = read_image_matrix(src)
    q = np.load(Path(src) / "queries.npy")
    truth = np.load(Path(src) / "truth.npy")
    index = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128
    t0 = time.perf_counter()
    index.add(x)
    build_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    sweep = {}
    for ef in EFS:
        index.hnsw.efSearch = ef
        best, found = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = np.concatenate([index.search(q[a:a + 100], K)[1] for a in range(0, len(q), 100)])
            best = min(best, time.perf_counter() - t0)
        sweep[str(ef)] = {"qps_batch100": len(q) / best, "recall_at_10": recall(found, truth)}
    return {"build_s": build_s, "sweep": sweep, "peak_rss_gb": peak_rss_gb(), "version": faiss.__version__}


def stage_build(home: str, src: str, quantization: str, on_disk: bool) -> dict:
    from app.build import run_in_process, start_build
    from app.memory import storage_of
    from app.db.models import MemoryVersion
    from app.store.base import Storage
    from benchmarks.train import fresh_runtime

    rt = fresh_runtime(Path(home))
    store = rt.store
    seal = store.seal
    timing = {}

    def timed_seal(*a, **k):
        t0 = time.perf_counter()
        try:
            return seal(*a, **k)
        finally:
            timing["seal_s"] = time.perf_counter() - t0

    store.seal = timed_seal
    t0 = time.perf_counter()
    v = start_build(rt, "scale", src, backbone=SPEC, fmt="embeddings", activate=True,
                    storage=Storage(quantization, on_disk))
    run_in_process(rt, v.id, show_progress=False)
    total = time.perf_counter() - t0
    with rt.db.session() as s:
        row = s.get(MemoryVersion, v.id)
        status, items, collection, storage = row.status, row.items_stored, row.collection, storage_of(row)
    applied = store.storage(collection)
    size = sum(f.stat().st_size for f in (rt.settings.vectors_dir / collection).rglob("*") if f.is_file())
    rt.close()
    return {"status": status, "items": items, "build_s": total, "seal_s": timing.get("seal_s"),
            "ingest_s": total - timing.get("seal_s", 0.0), "disk_gb": size / 1024 ** 3, "applied": applied,
            "asked": {"quantization": storage.quantization, "on_disk": storage.on_disk},
            "peak_rss_gb": peak_rss_gb()}


def stage_search(home: str, src: str, repeats: int) -> dict:
    from app.memory import resolve_collection
    from app.store.base import point_id
    from app.store.edge import EdgeStore
    from benchmarks.train import fresh_runtime

    rt = fresh_runtime(Path(home))
    collection, v = resolve_collection(rt, "scale")
    q = np.load(Path(src) / "queries.npy")
    truth = np.load(Path(src) / "truth.npy")
    row_of = {point_id("scale", v.version, f"{i:08d}"): i for i in range(v.items_stored)}
    rss_open = None

    def run(store, bs: int, nq: int) -> tuple[float, np.ndarray]:
        found = np.full((nq, K), -1)
        t0 = time.perf_counter()
        for a in range(0, nq, bs):
            for i, row in enumerate(store.search(collection, q[a:a + bs], using="image", k=K, with_payload=False)):
                found[a + i, :len(row)] = [row_of[h.id] for h in row]
        return time.perf_counter() - t0, found

    out = {"sweep": {}}
    default = rt.store
    with default.hold(collection):
        rss_open = peak_rss_gb()
        run(default, 100, len(q))  # warm: pages of the graph and the vectors
        for bs, nq in ((1, 200), (100, len(q))):
            best, found = min((run(default, bs, nq) for _ in range(repeats)), key=lambda r: r[0])
            out[f"qps_batch{bs}"] = nq / best
            out[f"recall_at_10_batch{bs}"] = recall(found, truth[:nq])
        for ef in EFS:  # the equal-recall comparison with faiss
            store = EdgeStore(rt.settings.vectors_dir, hnsw_ef=ef)
            best, found = min((run(store, 100, len(q)) for _ in range(repeats)), key=lambda r: r[0])
            out["sweep"][str(ef)] = {"qps_batch100": len(q) / best, "recall_at_10": recall(found, truth)}
    rt.close()
    return {**out, "default_ef": default.hnsw_ef, "peak_rss_gb": peak_rss_gb(), "rss_after_open_gb": rss_open}


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found.tolist(), truth.tolist())]))


def equal_recall_ratio(edge: dict, faiss_sweep: dict) -> dict:
    """Edge q/s at its default ef against faiss at the smallest efSearch reaching the same recall (or its best)."""
    target = edge["recall_at_10_batch100"]
    reach = [v for v in faiss_sweep.values() if v["recall_at_10"] >= target - 1e-9]
    f = max(reach, key=lambda v: v["qps_batch100"]) if reach else max(faiss_sweep.values(), key=lambda v: v["recall_at_10"])
    return {"edge_qps": edge["qps_batch100"], "edge_recall": target, "faiss_qps": f["qps_batch100"],
            "faiss_recall": f["recall_at_10"], "ratio": edge["qps_batch100"] / f["qps_batch100"]}


# -- the harness ---------------------------------------------------------------------------------------------------
def plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for opt in OPTIONS:
        sizes = [int(n) for n in results if opt in results[n]["options"]]
        if not sizes:
            continue
        rows = [results[str(n)]["options"][opt] for n in sizes]
        axes[0].plot(sizes, [r["build"]["build_s"] for r in rows], "o-", label=opt)
        axes[1].plot(sizes, [r["search"]["peak_rss_gb"] for r in rows], "o-", label=opt)
        axes[2].plot(sizes, [r["search"]["qps_batch100"] for r in rows], "o-", label=opt)
    sizes = [int(n) for n in results]
    axes[2].plot(sizes, [results[str(n)]["exact"]["qps_batch100"] for n in sizes], "k--", label="exact torch")
    axes[1].plot(sizes, [results[str(n)]["exact"]["peak_rss_gb"] for n in sizes], "k--", label="exact torch")
    for ax, title in zip(axes, ("build + seal (s)", "peak RSS while searching (GB)", "queries/s, batch 100")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("memory items")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--options", default=None, help="SIZE=opt+opt;SIZE=... (default: see the module docstring)")
    p.add_argument("--faiss-sizes", default="100000,300000")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/memory_scale.json")
    p.add_argument("--workdir", default=None)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        fn = {"data": stage_data, "exact": stage_exact, "faiss": stage_faiss, "build": stage_build,
              "search": stage_search}[args.stage]
        print(json.dumps(fn(**json.loads(args.args))))
        return 0

    from benchmarks.common import log, machine, write_result

    sizes = [int(x) for x in args.sizes.split(",") if x]
    options = {n: DEFAULT_OPTIONS.get(n, ["int8-on-disk"]) for n in sizes}
    if args.options:
        for part in args.options.split(";"):
            n, opts = part.split("=")
            options[int(n)] = opts.split("+")
    faiss_sizes = {int(x) for x in args.faiss_sizes.split(",") if x}
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="reco-bench-scale-", dir=args.workdir))
    results: dict = {}
    try:
        for n in sizes:
            src = str(work / f"data-{n}")
            log(f"{n}: writing {n} x {DIM} clustered pairs")
            res = {"data": stage("data", n=n, queries=args.queries, src=src, seed=args.seed), "options": {}}
            res["exact"] = stage("exact", src=src, repeats=args.repeats)
            log(f"{n}: exact torch {res['exact']['qps_batch100']:.0f} q/s (batch 100), "
                f"{res['exact']['qps_batch1']:.0f} q/s (batch 1)")
            if n in faiss_sizes:
                res["faiss"] = stage("faiss", src=src, repeats=args.repeats)
                log(f"{n}: faiss built in {res['faiss']['build_s']:.0f}s; " + ", ".join(
                    f"ef {ef}: {v['qps_batch100']:.0f} q/s @ {v['recall_at_10']:.4f}" for ef, v in
                    res["faiss"]["sweep"].items()))
            for opt in options[n]:
                quantization, on_disk = OPTIONS[opt]
                home = str(work / f"home-{n}-{opt}")
                b = stage("build", home=home, src=src, quantization=quantization, on_disk=on_disk)
                log(f"{n} {opt}: built in {b['build_s']:.0f}s (seal {b['seal_s']:.0f}s), {b['disk_gb']:.2f} GB on "
                    f"disk, peak RSS {b['peak_rss_gb']:.2f} GB, applied {b['applied']}")
                s = stage("search", home=home, src=src, repeats=args.repeats)
                row = {"build": b, "search": s,
                       "qps_vs_exact_batch100": s["qps_batch100"] / res["exact"]["qps_batch100"],
                       "qps_vs_exact_batch1": s["qps_batch1"] / res["exact"]["qps_batch1"]}
                if "faiss" in res:
                    row["vs_faiss_equal_recall"] = equal_recall_ratio(s, res["faiss"]["sweep"])
                res["options"][opt] = row
                log(f"{n} {opt}: {s['qps_batch100']:.0f} q/s batch 100 (x{row['qps_vs_exact_batch100']:.2f} exact), "
                    f"{s['qps_batch1']:.0f} q/s batch 1, recall@10 {s['recall_at_10_batch100']:.4f}, peak RSS "
                    f"{s['peak_rss_gb']:.2f} GB" + (f", x{row['vs_faiss_equal_recall']['ratio']:.2f} faiss"
                                                   if "faiss" in res else ""))
                shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
            results[str(n)] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)

    big = str(max(sizes))
    one_m = results.get("1000000", results[big])
    one_m_opt = one_m["options"].get("int8-on-disk") or next(iter(one_m["options"].values()))
    small = results.get("100000", {})
    vs_faiss = {opt: r["vs_faiss_equal_recall"]["ratio"] for opt, r in small.get("options", {}).items()
                if "vs_faiss_equal_recall" in r}
    headline = {
        "size": int(big) if "1000000" not in results else 1_000_000,
        "build_s_1m": one_m_opt["build"]["build_s"],
        "qps_vs_exact_1m": one_m_opt["qps_vs_exact_batch100"],
        "recall_at_10_1m": one_m_opt["search"]["recall_at_10_batch100"],
        "peak_rss_gb_1m": one_m_opt["search"]["peak_rss_gb"],
        "qps_vs_faiss_100k": max(vs_faiss.values()) if vs_faiss else None,
        "qps_vs_faiss_100k_by_option": vs_faiss,
    }
    out = Path(args.out)
    result = {
        "benchmark": "memory scale: build, seal, disk, RSS and search of 512-d memories by storage option, vs exact "
                     "torch kNN and faiss HNSW",
        "started": started, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/memory_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "setup": {"dim": DIM, "k": K, "queries": args.queries, "data": "clustered (train.py)",
                                        "backbone_spec": SPEC, "parts_of": PER_PART},
        "results": results, "headline": headline,
        "targets": {"build_s_1m": "<= 1200", "qps_vs_exact_1m": ">= 3", "recall_at_10_1m": ">= 0.95",
                    "peak_rss_gb_1m": "<= 3", "qps_vs_faiss_100k": ">= 0.7"},
    }
    write_result(out, result)
    png = plot(results, out.with_suffix(".png"))
    log(f"headline {json.dumps(headline)} -> {out}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
