"""Inference latency: `RecoEncoder.encode_image` (encode + retrieve + fuse) against bare backbone encoding, at
batch 1 and 64, ViT-B-32 (random weights) with a 100k-item memory, in one run.

    python benchmarks/inference.py [--memory-size 100000] [--batches 1,64] [--repeats 30,7]
                                   [--out benchmarks/results/inference.json]

Memory: `--memory-size` pairs of 512-d precomputed embeddings in clip-retrieval's layout, built through the
product (`start_build` + `run_in_process`, format `embeddings`, backbone spec ViT-B-32: the space is named, no
image is encoded) into a fresh RECO_HOME, sealed (HNSW) and activated. The vectors are CLIP-like by default (the
clustered generator of benchmarks/search.py, as in benchmarks/train.py) or iid random with `--data random`
(app.synthetic.write_embeddings). A small second memory of pairs trains a RECO model against it through the
product (create_job + run_training: k=10, one epoch, batch 64: only its shape matters here, D=512, k=10).

Measured, same process, same Backbone object (RecoEncoder.load(model, runtime=rt) and get_backbone share it):
  bare       encoder.backbone.encode_images(images): preprocess + the ViT-B-32 image tower
  reco       encoder.encode_image(images): the same encoding, then retrieval from the model's memory (its active
             version, resolved in the metadata DB on every call; the encoder keeps the collection open between
             calls, app/encoder.py KEEP_OPEN_S) and the fusion layer: a serving loop
  reco_cold  the same call followed by encoder.close(), timed together: every call opens the embedded shard and
             flushes and closes it after, as every call did before the encoder kept it open (and as the first call
             after KEEP_OPEN_S idle still does)
Images: 224-px PIL drawings (app.synthetic.render), so preprocessing is a centre crop, no upscaling.
encoder.timing (reset before each call) splits a RECO call into encode, search (collection resolve, opening it if
closed, kNN, the neighbours' vectors) and fuse; other = the rest (reco_cold: the close). Modes alternate in blocks
of `--calls` calls (default 1: call by call), in a rotating order, repeat by repeat, so that load from other jobs
on the machine hits all alike; latencies are medians over every call, ratios are of medians. The same ratio is
also computed from each RECO call's own split: (bare + what the call added to its encoding) / bare.

Threads: the headline runs torch with 1 intra-op thread; torch's default (one per core) runs too, interleaved,
and is reported beside it. On a small machine shared with other jobs, two OpenMP threads stall whenever one is
descheduled (bare batch-1 latency was seen anywhere from 90 ms to 2 s), which drowns what is measured here.
Target: RECO latency <= 1.3x bare at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to download
os.environ["RECO_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log, machine, write_result  # noqa: E402
from app import synthetic  # noqa: E402
from app.db.models import FusionModel, ModelStatus  # noqa: E402
from app.encoder import RecoEncoder, Timing  # noqa: E402
from app.memory import resolve_collection  # noqa: E402
from app.train import TrainConfig, create_job, run_training  # noqa: E402
from benchmarks.train import build_memory, fresh_runtime, write_embeddings  # noqa: E402

TARGET = 1.3
SPEC, DIM = "ViT-B-32", 512
MODES = ("bare", "reco", "reco_cold")


def one_call(enc: RecoEncoder, mode: str, images: list) -> dict:
    enc.timing = Timing()
    t0 = time.perf_counter()
    if mode == "bare":
        out = enc.backbone.encode_images(images)
    else:
        out = enc.encode_image(images)
        if mode == "reco_cold":
            enc.close()
    wall = time.perf_counter() - t0
    assert out.shape == (len(images), DIM)
    row = {"wall_s": wall}
    if mode != "bare":
        row.update(encode_s=enc.timing.encode, search_s=enc.timing.search, fuse_s=enc.timing.fuse,
                   other_s=wall - enc.timing.encode - enc.timing.search - enc.timing.fuse)
    return row


def block(enc: RecoEncoder, mode: str, images: list, calls: int) -> list[dict]:
    """`calls` timed calls; the memory starts the block as the mode finds it in steady state (untimed)."""
    if mode == "reco":
        probe = np.zeros((1, DIM), np.float32)
        probe[0, 0] = 1.0
        enc.refine(probe, "image")  # opens the memory, as the serving loop's previous call left it
    elif mode == "reco_cold":
        enc.close()
    return [one_call(enc, mode, images) for _ in range(calls)]


def summarise(rows: list[dict]) -> dict:
    walls = [r["wall_s"] for r in rows]
    out = {"latency_ms_median": 1000 * statistics.median(walls), "latency_ms_min": 1000 * min(walls),
           "latency_ms_p90": 1000 * float(np.percentile(walls, 90)), "calls": len(walls),
           "latency_ms_all": [1000 * w for w in walls]}
    if "search_s" in rows[0]:
        out["split_ms_median"] = {k[:-2]: 1000 * statistics.median(r[k] for r in rows)
                                  for k in ("encode_s", "search_s", "fuse_s", "other_s")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--memory-size", type=int, default=100_000, help="items in the memory retrieved from")
    p.add_argument("--pairs", type=int, default=1024, help="training pairs of the (throw-away) RECO model")
    p.add_argument("--data", choices=("clustered", "random"), default="clustered")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", default="30,7", help="rotations of the modes, per batch size")
    p.add_argument("--calls", default="1,1", help="calls per mode block, per batch size")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", default=None,
                   help="torch intra-op thread counts to run, interleaved (default: 1, then torch's default); "
                        "the first is the headline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/inference.json")
    p.add_argument("--workdir", default=None, help="parent of the temporary directory")
    p.add_argument("--home", default=None,
                   help="keep the RECO_HOME here and reuse its memory and model on the next run (development)")
    args = p.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",") if x.strip()]
    def per_batch(text: str) -> list[int]:
        vals = [int(x) for x in text.split(",") if x.strip()]
        return (vals + [vals[-1]] * len(batches))[: len(batches)]

    calls, repeats = per_batch(args.calls), per_batch(args.repeats)
    default_threads = torch.get_num_threads()
    threads = list(dict.fromkeys(int(x) for x in args.threads.split(",") if x.strip())) if args.threads \
        else list(dict.fromkeys([1, default_threads]))

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="reco-bench-inference-", dir=args.workdir))
    home = Path(args.home) if args.home else work / "home"
    setup: dict = {}
    try:
        rt = fresh_runtime(home)
        try:
            rt.db
            setup.update(prepare(rt, args, work))
            t0 = time.perf_counter()
            enc = RecoEncoder.load("bench", runtime=rt)
            setup["encoder_load_s"] = time.perf_counter() - t0
            collection, version = resolve_collection(rt, enc.memory)
            setup["memory_items"] = version.items_stored
            log(f"encoder loaded in {setup['encoder_load_s']:.1f}s (device {enc.device}); memory {enc.memory} "
                f"v{version.version}: {version.items_stored} items, k={enc.k}")
            palette = [synthetic.concept(i) for i in range(max(batches))]
            images = [synthetic.render(c, s, size=args.image_size, seed=1_000_000 + i) for i, (c, s) in enumerate(palette)]

            # the same numbers, refined or not: a sanity check outside the timings
            v_bare = enc.backbone.encode_images(images[:4])
            v_plain = enc.encode_image(images[:4], refine=False)
            v_reco = enc.encode_image(images[:4])
            check = {"bare_equals_unrefined": bool(np.allclose(v_bare, v_plain, atol=1e-6)),
                     "refined_differs_cosine_mean": float((v_bare * v_reco).sum(1).mean())}

            for t in threads:  # warm-up: kernels, allocator, page cache of the shard
                torch.set_num_threads(t)
                for b in batches:
                    for mode in MODES:
                        block(enc, mode, images[:b], 2)
            results: dict[str, dict] = {}
            for b, n_calls, n_repeats in zip(batches, calls, repeats):
                rows = {(t, m): [] for t in threads for m in MODES}
                per_repeat: dict[int, list] = {t: [] for t in threads}
                for r in range(n_repeats):
                    for t in threads:
                        torch.set_num_threads(t)
                        order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
                        got = {m: block(enc, m, images[:b], n_calls) for m in order}
                        med = {m: statistics.median(x["wall_s"] for x in got[m]) for m in MODES}
                        for m in MODES:
                            rows[t, m] += got[m]
                        per_repeat[t].append({f"{m}_vs_bare": med[m] / med["bare"] for m in MODES if m != "bare"})
                        log(f"batch {b} repeat {r + 1}/{n_repeats} {t} thread(s): " + ", ".join(
                            f"{m} {1000 * med[m]:.1f} ms" for m in MODES))
                for t in threads:
                    s_ = {m: summarise(rows[t, m]) for m in MODES}
                    bare = s_["bare"]["latency_ms_median"]
                    # what a RECO call adds to its own encoding (same call, so immune to drift between calls)
                    extra = {m: 1000 * statistics.median(x["wall_s"] - x["encode_s"] for x in rows[t, m])
                             for m in ("reco", "reco_cold")}
                    results.setdefault(thread_key(t), {})[str(b)] = {
                        "batch": b, "torch_threads": t, "calls_per_block": n_calls, "repeats": n_repeats, **s_,
                        "reco_vs_bare": s_["reco"]["latency_ms_median"] / bare,
                        "reco_cold_vs_bare": s_["reco_cold"]["latency_ms_median"] / bare,
                        "added_ms_median": extra,
                        "reco_vs_bare_from_split": (bare + extra["reco"]) / bare,
                        "per_repeat": per_repeat[t],
                        "per_item_ms": {m: s_[m]["latency_ms_median"] / b for m in MODES},
                    }
            torch.set_num_threads(threads[0])
            info = {"k": enc.k, "search": enc.search, "fusion": enc.fusion_mode, "memory": enc.memory,
                    "device": enc.device, "image_size_px": args.image_size,
                    "model_input_px": list(getattr(enc.backbone.model.visual, "image_size", [])) or None}
        finally:
            if "enc" in locals():
                enc.close()
            rt.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head = results[thread_key(threads[0])]
    ratios = {f"reco_vs_bare_batch{b}": head[str(b)]["reco_vs_bare"] for b in batches}
    for key, res in results.items():
        ratios.update({f"reco_vs_bare_batch{b}_{key}": res[str(b)]["reco_vs_bare"] for b in batches})
        ratios.update({f"reco_vs_bare_from_split_batch{b}_{key}": res[str(b)]["reco_vs_bare_from_split"]
                       for b in batches})
        ratios.update({f"reco_cold_vs_bare_batch{b}_{key}": res[str(b)]["reco_cold_vs_bare"] for b in batches})
    ratios["basis"] = (f"{thread_key(threads[0])}: median latency of encoder.encode_image / median latency of "
                       f"backbone.encode_images, same images and Backbone, modes alternating call by call in a rotating "
                       f"order, {'/'.join(map(str, repeats))} repeats (batch {'/'.join(map(str, batches))}), one "
                       "process (lower is better)")
    met = {f"batch{b}": head[str(b)]["reco_vs_bare"] <= TARGET for b in batches}
    result = {
        "benchmark": "inference: RecoEncoder.encode_image (encode + retrieve + fuse) vs bare backbone encoding",
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine(), "torch_threads_default": default_threads, "torch_threads_run": threads},
        "setup": {**setup, "data": args.data, "backbone": SPEC + " (random weights, seed 0)", "dim": DIM, **info},
        "check": check,
        "method": {
            "bare": "encoder.backbone.encode_images(images)",
            "reco": "encoder.encode_image(images): a plain loop of calls (the encoder keeps its memory open)",
            "reco_cold": "encoder.encode_image(images); encoder.close(): the memory opened and closed by each call",
            "split": "encoder.timing, reset before each call: encode, search (resolve, open if closed, kNN, "
                     "vectors), fuse; other = wall - the three (reco_cold: the close)",
            "timing": "modes alternate call by call (blocks of --calls), rotating order; medians over all calls",
            "from_split": "reco_vs_bare_from_split = (bare median + median of (wall - encode) over the RECO calls) / "
                          "bare median: the RECO call's own additions, unaffected by load drifting between calls",
        },
        "results": results,
        "target": {"reco_vs_bare": TARGET},
        "ratios": ratios,
        "target_met": met,
    }
    out = Path(args.out)
    write_result(out, result)
    for key, res in results.items():
        for b in batches:
            r = res[str(b)]
            log(f"{key} batch {b}: bare {r['bare']['latency_ms_median']:.1f} ms, reco "
                f"{r['reco']['latency_ms_median']:.1f} ms (x{r['reco_vs_bare']:.3f}; split "
                f"{fmt(r['reco']['split_ms_median'])}), cold {r['reco_cold']['latency_ms_median']:.1f} ms "
                f"(x{r['reco_cold_vs_bare']:.3f})")
    log(f"target (<= {TARGET}x): {met} -> {out}")
    return 0


def prepare(rt, args, work: Path) -> dict:
    """The memory, a pairs memory and a trained model; reused when --home already holds them."""
    with rt.db.session() as s:
        if s.query(FusionModel).filter_by(name="bench", status=ModelStatus.READY).one_or_none() is not None:
            log(f"reusing the memory and model in {rt.settings.home}")
            return {"reused_home": True}
    out = {}
    for name, n, seed in (("mem", args.memory_size, args.seed), ("pairs", args.pairs, args.seed + 7)):
        src = work / f"emb-{name}"
        t0 = time.perf_counter()
        n = write_embeddings(src, n, DIM, args.data, seed)
        out[f"{name}_embeddings_write_s"] = time.perf_counter() - t0
        log(f"building memory {name}: {n} x {DIM}-d ({args.data})")
        built = build_memory(rt, src, SPEC, name)
        shutil.rmtree(src, ignore_errors=True)
        out[f"{name}_build_s"] = built["build_s"]
        log(f"memory {name} built in {built['build_s']:.1f}s")
    cfg = TrainConfig(k=10, epochs=1, batch_size=64, seed=args.seed)
    create_job(rt, "bench", "pairs", "mem", cfg)
    t0 = time.perf_counter()
    metrics = run_training(rt, "bench", progress=False)
    out["model_train_s"] = time.perf_counter() - t0
    out["model_train_steps"] = metrics["steps"]
    log(f"model trained in {out['model_train_s']:.1f}s ({metrics['steps']} steps)")
    return out


def thread_key(t: int) -> str:
    return f"{t}thread{'s' if t > 1 else ''}"


def fmt(split: dict) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in split.items())


if __name__ == "__main__":
    raise SystemExit(main())
