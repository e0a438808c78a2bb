"""A delta version against a full build, one run: a 1M-item memory built from embeddings, then a delta of 10k new
items (and 1k keys removed) onto it, through the product (`start_build(parent=...)` + `run_in_process`, as `reco
memory build NAME SOURCE --from 1 --remove-keys FILE` does).

    python benchmarks/delta.py [--n 1000000] [--delta 10000] [--remove 1000] [--out benchmarks/results/delta.json]

Data: the clustered generator of benchmarks/train.py (CLIP-like 512-d image vectors, text vectors correlated with
them), n + delta rows drawn at once; the first n are the parent's source, the last `delta` (keys of their own) the
delta's. Backbone spec ViT-B-32 (no image is encoded; `encoded_items` counts the items the delta read and wrote
as new vectors). Storage `auto` (int8 at this size). Recall@10 of the `image` vector against exact kNN over the
vectors each version holds, for held-out queries, checks that the delta searches as well as a full build.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RECO_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks.common import build_ready, log, machine, write_result  # noqa: E402

DIM, SPEC, PER_PART, K = 512, "ViT-B-32", 10_000, 10


def split_source(root: Path, n: int, delta: int, seed: int) -> tuple[Path, Path]:
    """n + delta rows in clip-retrieval's layout; the last `delta` rows' parts moved to a source of their own."""
    from benchmarks.train import write_embeddings

    allrows = root / "all"
    per_part = math.gcd(n, delta, PER_PART)  # parts that end where the delta's rows begin
    write_embeddings(allrows, n + delta, DIM, "clustered", seed, per_part=per_part)
    base, new = root / "base", root / "delta"
    first_new = n // per_part
    for sub, stem in (("img_emb", "img_emb"), ("text_emb", "text_emb"), ("metadata", "metadata")):
        (new / sub).mkdir(parents=True)
        for p in range(first_new, (n + delta) // per_part):
            ext = "parquet" if sub == "metadata" else "npy"
            shutil.move(allrows / sub / f"{stem}_{p}.{ext}", new / sub / f"{stem}_{p - first_new}.{ext}")
    allrows.rename(base)
    return base, new


def timed_seals(store) -> dict:
    """Record how long each seal takes (the HNSW build), by collection."""
    seal, times = store.seal, {}

    def timed(collection, *a, **k):
        t0 = time.perf_counter()
        try:
            return seal(collection, *a, **k)
        finally:
            times[collection] = time.perf_counter() - t0

    store.seal = timed
    return times


def timed_copies(store) -> dict:
    copy, times = store.copy, {}

    def timed(source, target, *a, **k):
        t0 = time.perf_counter()
        try:
            return copy(source, target, *a, **k)
        finally:
            times[target] = time.perf_counter() - t0

    store.copy = timed
    return times


def recall(rt, collection: str, queries: np.ndarray) -> float:
    """recall@10 of the store's search against exact kNN over the vectors the collection holds."""
    ids, rows = [], []
    for b_ids, vectors, _p in rt.store.scan_vectors(collection, ["image"], batch=8192):
        ids += b_ids
        rows.append(vectors["image"])
    x = np.concatenate(rows)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.argsort(-(queries @ x.T), axis=1)[:, :K]
    found = rt.store.search(collection, queries, "image", K, with_payload=False)
    hit = sum(len({ids[j] for j in t} & {h.id for h in f}) for t, f in zip(truth, found))
    return hit / (K * len(queries))


def segments(rt, collection: str) -> int | None:
    try:
        import qdrant_edge

        shard = qdrant_edge.EdgeShard.load(str(rt.settings.vectors_dir / collection))
        try:
            return shard.info().segments_count
        finally:
            shard.close()
    except Exception:  # noqa: BLE001 - a server store: not reported
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--delta", type=int, default=10_000)
    ap.add_argument("--remove", type=int, default=1_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="Scratch directory (default: a temporary one, removed after).")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "delta.json"))
    args = ap.parse_args(argv)
    from benchmarks.search import clustered
    from benchmarks.train import fresh_runtime

    started = dt.datetime.now(dt.timezone.utc)
    work = Path(args.work or tempfile.mkdtemp(prefix="reco-delta-"))
    try:
        log(f"data: {args.n:,} + {args.delta:,} rows")
        t0 = time.perf_counter()
        base_src, delta_src = split_source(work / "src", args.n, args.delta, args.seed)
        data_s = time.perf_counter() - t0
        gen = dict(clusters=min(1000, max(1, (args.n + args.delta) // 100)), centre_rank=128, cluster_rank=48,
                   mean_weight=0.5, spread=0.6, iso_noise=0.15)
        queries = clustered(args.n + args.delta + args.queries, DIM, seed=args.seed, **gen)[-args.queries:]
        queries = queries.astype(np.float32)
        rng = np.random.default_rng(args.seed)
        removed = [f"{i:08d}" for i in sorted(rng.choice(args.n, args.remove, replace=False))]

        rt = fresh_runtime(work / "home")
        seals, copies = timed_seals(rt.store), timed_copies(rt.store)
        log("full build of the parent")
        full_s, full = build_ready(rt, "scale", base_src, SPEC)
        log(f"  {full_s:.0f} s ({seals[full['collection']]:.0f} s seal)")
        log("delta")
        delta_s, delta = build_ready(rt, "scale", delta_src, None, activate=False, parent=full["version"],
                                     remove_keys=removed)
        log(f"  {delta_s:.0f} s ({copies[delta['collection']]:.0f} s copy, {seals[delta['collection']]:.0f} s seal)")
        lineage = delta["details"]["lineage"]
        expected = args.n - args.remove + args.delta
        if delta["items"] != expected or lineage["added"] != args.delta or lineage["removed"] != args.remove:
            raise SystemExit(f"delta holds {delta['items']} items ({lineage}), expected {expected}")
        log("recall against exact kNN")
        result = {
            "benchmark": "a delta version (10k new items, 1k keys removed) onto a 1M-item version, against the full "
                         "build of that version, one run",
            "command": "python benchmarks/delta.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(),
            "setup": {"n": args.n, "delta": args.delta, "removed_keys": args.remove, "dim": DIM, "backbone": SPEC,
                      "source": "embeddings (clip-retrieval layout)", "storage": "auto",
                      "applied": rt.store.storage(delta["collection"]), "data_write_s": data_s},
            "full_build": {"wall_s": full_s, "seal_s": seals[full["collection"]], "items": full["items"],
                           "segments": segments(rt, full["collection"]),
                           "recall_at_10": recall(rt, full["collection"], queries)},
            "delta_build": {"wall_s": delta_s, "copy_s": copies[delta["collection"]],
                            "seal_s": seals[delta["collection"]],
                            "rest_s": delta_s - copies[delta["collection"]] - seals[delta["collection"]],
                            "items": delta["items"], "lineage": lineage, "skip_reasons": delta["skip_reasons"],
                            "segments": segments(rt, delta["collection"]),
                            "recall_at_10": recall(rt, delta["collection"], queries)},
        }
        result["headline"] = {"delta_vs_full_build": delta_s / full_s, "encoded_items": lineage["added"] +
                              lineage["updated"], "delta_s": delta_s, "full_build_s": full_s,
                              "bar": "delta_vs_full_build <= 0.15"}
        rt.close()
        write_result(args.out, result)
        log(f"delta {delta_s:.0f} s / full build {full_s:.0f} s = {delta_s / full_s:.3f}; recall@10 full "
            f"{result['full_build']['recall_at_10']:.4f}, delta {result['delta_build']['recall_at_10']:.4f}")
        return 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
