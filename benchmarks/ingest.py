"""Ingestion throughput: the whole `reco memory build` pipeline against bare backbone encoding, same run.

    python benchmarks/ingest.py [--tiny-items 4096] [--vit-items 256] [--models tiny,vit-b-32]
                                [--tiny-repeats 5] [--vit-repeats 3] [--decode-workers N]
                                [--out benchmarks/results/ingest.json]

A smoke run (about a minute): python benchmarks/ingest.py --tiny-items 256 --vit-items 32 --tiny-repeats 2
    --vit-repeats 2 --out /tmp/ingest-smoke.json

Data: img2dataset-style WebDataset tars of 64-px PNGs with captions (app.synthetic.write_wds).

Pipeline: the product's own path in the embedded profile, in this process: a fresh RECO_HOME (migrated once,
before timing), `start_build(rt, name, source, backbone=SPEC)` then `run_in_process(rt, version)`, timed from
start_build until the version is ready. That covers reading the tars, decoding, preprocessing, encoding images
and captions, point ids and payloads, upserting into the embedded Qdrant engine, the metadata rows and sealing
(one merged, indexed segment; no HNSW graph, as both corpora are under Qdrant's 10 MB-per-vector full-scan
threshold and are searched exactly: benchmarks/search.py times an HNSW build). Each timed build is a new version
of the same memory, as a user rebuilding it would make.

Bare: what a user's minimal script does with the same items already in memory as (PNG bytes, caption): PIL
decode, `backbone.preprocess`, `backbone.encode_image_tensor` and `backbone.encode_texts`, batch after batch
of the pipeline's batch size, serially, outputs kept.

The pipeline decodes with RECO_DECODE_WORKERS processes and encodes RECO_ENCODE_BATCH items per call, both by
device when unset (app/decode.py, app/ingest.py: inline and 128 on the CPU); --decode-workers sets the former.

Both use the same Backbone object (app.backbone.get_backbone caches it), so model loading is outside both; each
side is warmed up once before timing. Pipeline and bare passes alternate (P B, B P, P B, ...) so that load from
other jobs on the machine hits both alike. Per model: items/s medians over the repeats, and the ratio, the median
over the repeats of (pipeline items/s / bare items/s) of one adjacent pair (the ratio of the two medians is
reported too). Target: >= 0.85. Models: the 64-d tiny CLIP of
app.synthetic.TINY_CONFIG and ViT-B-32 with random (seeded) weights, 512-d.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights and a local config: nothing to download
os.environ["RECO_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import log, machine, write_result  # noqa: E402
from app import decode as decode_mod  # noqa: E402
from app import ingest as ingest_mod  # noqa: E402
from app import synthetic  # noqa: E402
from app.backbone import BackboneSpec, get_backbone  # noqa: E402
from app.build import run_in_process, start_build  # noqa: E402
from app.corpus.wds import read as read_wds  # noqa: E402
from app.db.models import MemoryVersion, VersionStatus  # noqa: E402
from app.runtime import Runtime  # noqa: E402
from app.settings import ENV_VARS, Settings  # noqa: E402

TARGET = 0.85
MODELS = ("tiny", "vit-b-32")


# -- instrumentation (wall time spent in a few calls; no change to what they do) ----------------------------
class Timers:
    def __init__(self):
        self.t: dict[str, float] = {}

    @contextlib.contextmanager
    def wrap(self, obj, attr: str, label: str):
        """Patch obj.attr (an instance attribute shadowing the method) to add its wall time under label."""
        orig = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)


# -- the two sides ---------------------------------------------------------------------------------------
def pipeline_pass(rt: Runtime, name: str, source: str, spec: str, backbone) -> dict:
    """One full build of SOURCE as a new version of NAME; wall time from start_build to ready."""
    tm = Timers()
    with contextlib.ExitStack() as st:
        st.enter_context(tm.wrap(rt.store, "seal", "seal_s"))
        st.enter_context(tm.wrap(rt.store, "upsert", "upsert_s"))
        st.enter_context(tm.wrap(backbone, "encode_image_tensor", "encode_image_s"))
        st.enter_context(tm.wrap(backbone, "encode_tokens", "encode_text_s"))
        t0, c0 = time.perf_counter(), time.process_time()
        v = start_build(rt, name, source, backbone=spec)
        run_in_process(rt, v.id, show_progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with rt.db.session() as s:
        row = s.get(MemoryVersion, v.id)
        status, stored, skipped, collection = row.status, row.items_stored, row.items_skipped, row.collection
        number = row.version
    if status != VersionStatus.READY:
        raise SystemExit(f"pipeline build ended {status}, not ready")
    return {"wall_s": wall, "cpu_per_wall": cpu / wall, "items": stored, "skipped": skipped,
            "version": number, "collection": collection, **tm.t}


def bare_pass(backbone, items: list[tuple[str, bytes, str]], bs: int, keep: bool = False) -> dict:
    """A minimal script: decode, preprocess, encode images and captions, batch after batch."""
    from PIL import Image

    tm: dict[str, float] = {"decode_s": 0.0, "preprocess_s": 0.0, "encode_image_s": 0.0, "encode_text_s": 0.0}
    img_out, txt_out = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for a in range(0, len(items), bs):
        chunk = items[a:a + bs]
        t = time.perf_counter()
        ims = [Image.open(io.BytesIO(png)).convert("RGB") for _, png, _ in chunk]
        t1 = time.perf_counter()
        px = torch.stack([backbone.preprocess(im) for im in ims])
        t2 = time.perf_counter()
        img_out.append(backbone.encode_image_tensor(px))
        t3 = time.perf_counter()
        txt_out.append(backbone.encode_texts([cap for _, _, cap in chunk]))
        t4 = time.perf_counter()
        tm["decode_s"] += t1 - t
        tm["preprocess_s"] += t2 - t1
        tm["encode_image_s"] += t3 - t2
        tm["encode_text_s"] += t4 - t3
    img, txt = np.concatenate(img_out), np.concatenate(txt_out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"wall_s": wall, "cpu_per_wall": cpu / wall, "items": len(img), **tm}
    if keep:
        out["vectors"] = (img, txt)
    return out


def check_same_vectors(rt: Runtime, collection: str, items, img: np.ndarray, txt: np.ndarray) -> dict:
    """The pipeline stored, under each key, the vectors the bare script computes (outside the timings)."""
    row = {key: i for i, (key, _, _) in enumerate(items)}
    n, d_img, d_txt = 0, 0.0, 0.0
    for _ids, im, tx, payloads in rt.store.scan(collection):
        idx = np.array([row[p["key"]] for p in payloads])
        d_img = max(d_img, float(np.abs(im - img[idx]).max()))
        d_txt = max(d_txt, float(np.abs(tx - txt[idx]).max()))
        n += len(idx)
    return {"points": n, "max_abs_diff_image": d_img, "max_abs_diff_text": d_txt,
            "same": n == len(items) and d_img < 1e-4 and d_txt < 1e-4}


# -- one model ---------------------------------------------------------------------------------------------
def bench_model(label: str, spec: str, n_items: int, per_shard: int, repeats: int, work: Path, seed: int,
                decode_workers: int | None = None) -> dict:
    n_shards = max(1, -(-n_items // per_shard))
    n_items = n_shards * per_shard
    corpus = work / f"corpus-{label}"
    log(f"[{label}] writing {n_shards} shard(s) x {per_shard} items (64-px PNG + caption)")
    synthetic.write_wds(corpus, n_shards, per_shard, seed=seed)
    items = [(it.key, it.image_bytes, it.caption) for p in sorted(corpus.glob("*.tar"))
             for it in read_wds({"path": str(p), "name": p.name})]
    assert len(items) == n_items

    home = work / f"home-{label}"
    for var in ENV_VARS:
        if var not in ("RECO_OFFLINE",):
            os.environ.pop(var, None)
    os.environ["RECO_HOME"] = str(home)
    if decode_workers is not None:
        os.environ["RECO_DECODE_WORKERS"] = str(decode_workers)
    rt = Runtime(Settings.from_env())
    load_before = os.getloadavg()[0]
    try:
        t0 = time.perf_counter()
        rt.db  # the embedded profile migrates its metadata DB on first use, once per RECO_HOME: not timed
        migrate_s = time.perf_counter() - t0
        canonical = BackboneSpec.parse(spec).canonical
        t0 = time.perf_counter()
        backbone = get_backbone(canonical, rt.settings.device, rt.settings.offline)  # the object run_shard uses
        load_s = time.perf_counter() - t0
        bs = ingest_mod.encode_batch(rt.settings.encode_batch, backbone.device)  # what run_shard will use
        workers = decode_mod.decode_workers(rt.settings.decode_workers, backbone.device)
        log(f"[{label}] backbone {canonical} loaded in {load_s:.1f}s (dim {backbone.dim}, device {backbone.device}); "
            f"batch {bs}, decode workers {workers}")
        warm_corpus = work / f"warm-{label}"
        synthetic.write_wds(warm_corpus, 1, bs, seed=seed + 1, prefix="w")
        warm_items = [(it.key, it.image_bytes, it.caption) for p in sorted(warm_corpus.glob("*.tar"))
                      for it in read_wds({"path": str(p), "name": p.name})]

        # warm-up: one small build and one bare pass (imports, engine, allocator, kernels)
        pipeline_pass(rt, "warmup", str(warm_corpus), spec, backbone)
        bare_pass(backbone, warm_items, bs)

        name = f"bench-{label.replace('.', '-')}"
        pipe, bare, check = [], [], None
        for r in range(repeats):
            order = ("pipeline", "bare") if r % 2 == 0 else ("bare", "pipeline")
            for side in order:
                if side == "pipeline":
                    p = pipeline_pass(rt, name, str(corpus), spec, backbone)
                    assert p["items"] == n_items, p
                    pipe.append(p)
                    log(f"[{label}] repeat {r + 1}/{repeats} pipeline: {n_items / p['wall_s']:.1f} items/s "
                        f"({p['wall_s']:.2f}s; seal {p.get('seal_s', 0):.2f}s, upsert {p.get('upsert_s', 0):.2f}s)")
                else:
                    b = bare_pass(backbone, items, bs, keep=check is None)
                    vecs = b.pop("vectors", None)
                    if vecs is not None:
                        bare_vectors = vecs
                    bare.append(b)
                    log(f"[{label}] repeat {r + 1}/{repeats} bare:     {n_items / b['wall_s']:.1f} items/s "
                        f"({b['wall_s']:.2f}s)")
                if check is None and pipe and bare:
                    check = check_same_vectors(rt, pipe[0]["collection"], items, *bare_vectors)
                    del bare_vectors
                    log(f"[{label}] stored vectors match the bare ones: {check['same']} "
                        f"(max |diff| image {check['max_abs_diff_image']:.2e}, text {check['max_abs_diff_text']:.2e})")
    finally:
        rt.close()

    pipe_ips = [n_items / p["wall_s"] for p in pipe]
    bare_ips = [n_items / b["wall_s"] for b in bare]
    pairs = [p / b for p, b in zip(pipe_ips, bare_ips)]  # repeat r's pipeline and bare passes ran back to back
    ratio = statistics.median(pairs)
    ratio_of_medians = statistics.median(pipe_ips) / statistics.median(bare_ips)
    no_seal = [n_items / (p["wall_s"] - p.get("seal_s", 0.0)) for p in pipe]
    pipe_wall = statistics.median(p["wall_s"] for p in pipe)

    def med(rows, key):
        return statistics.median(r.get(key, 0.0) for r in rows)

    timed = ("encode_image_s", "encode_text_s", "upsert_s", "seal_s")
    pipe_stages = {k: med(pipe, k) for k in timed}
    pipe_stages["everything_else_s"] = statistics.median(p["wall_s"] - sum(p.get(k, 0.0) for k in timed) for p in pipe)
    return {
        "backbone": "app.synthetic.TINY_CONFIG (a config .json)" if label == "tiny" else canonical,
        "backbone_config": synthetic.TINY_CONFIG if label == "tiny" else {"model": spec, "weights": "random, seed 0"},
        "dim": backbone.dim,
        "device": str(backbone.device),
        "model_image_size": _image_size(backbone),
        "items": n_items,
        "shards": n_shards,
        "items_per_shard": per_shard,
        "batch_size": bs,
        "decode_workers": workers,
        "repeats": repeats,
        "setup_not_timed": {"backbone_load_s": load_s, "metadata_db_migrate_s": migrate_s},
        "loadavg_1min": {"before": load_before, "after": list(os.getloadavg())[0]},
        "pipeline": {
            "items_per_s_median": statistics.median(pipe_ips),
            "items_per_s_all": pipe_ips,
            "wall_s_median": pipe_wall,
            "items_per_s_excluding_seal_median": statistics.median(no_seal),
            "stage_s_median": pipe_stages,
            "stage_note": "encode_* and upsert_s are wall time inside those calls (main thread); everything_else_s "
                          "is the rest: tar reading, decoding and preprocessing not hidden behind encoding, ids, "
                          "payloads, collection opens, metadata rows",
            "cpu_busy_per_wall_second_median": med(pipe, "cpu_per_wall"),
            "runs": [{k: v for k, v in p.items() if k != "collection"} for p in pipe],
        },
        "bare": {
            "items_per_s_median": statistics.median(bare_ips),
            "items_per_s_all": bare_ips,
            "wall_s_median": med(bare, "wall_s"),
            "stage_s_median": {k: med(bare, k) for k in ("decode_s", "preprocess_s", "encode_image_s",
                                                         "encode_text_s")},
            "cpu_busy_per_wall_second_median": med(bare, "cpu_per_wall"),
        },
        "vectors_check": check,
        "ratio_pipeline_vs_bare": ratio,
        "ratio_pipeline_vs_bare_per_pair": pairs,
        "ratio_of_median_items_per_s": ratio_of_medians,
        "ratio_excluding_seal": statistics.median(x / b for x, b in zip(no_seal, bare_ips)),
        "seal_share_of_pipeline_wall": pipe_stages["seal_s"] / pipe_wall,
        "meets_target": ratio >= TARGET,
    }


def _image_size(backbone):
    size = getattr(getattr(backbone.model, "visual", None), "image_size", None)
    return list(size) if isinstance(size, (tuple, list)) else size


# -- main ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny-items", type=int, default=4096)
    p.add_argument("--vit-items", type=int, default=256)
    p.add_argument("--tiny-per-shard", type=int, default=1024, help="items per tar shard (tiny model)")
    p.add_argument("--vit-per-shard", type=int, default=128, help="items per tar shard (ViT-B-32)")
    p.add_argument("--tiny-repeats", type=int, default=5, help="alternating pipeline/bare pairs (tiny model)")
    p.add_argument("--vit-repeats", type=int, default=3, help="alternating pipeline/bare pairs (ViT-B-32)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="RECO_DECODE_WORKERS for the pipeline (default: auto, inline on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/ingest.json")
    p.add_argument("--workdir", default=None, help="parent of the temporary directory")
    args = p.parse_args(argv)
    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        p.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    if min(args.tiny_items, args.vit_items, args.tiny_repeats, args.vit_repeats) < 1:
        p.error("items and repeats must be >= 1")

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="reco-bench-ingest-", dir=args.workdir))
    results = {}
    try:
        for m in models:
            if m == "tiny":
                spec = str(synthetic.write_tiny_config(work / "tiny-clip.json"))
                results["tiny"] = bench_model("tiny", spec, args.tiny_items, min(args.tiny_per_shard, args.tiny_items),
                                              args.tiny_repeats, work, args.seed, args.decode_workers)
            else:
                results["vit_b_32"] = bench_model("vit-b-32", "ViT-B-32", args.vit_items,
                                                  min(args.vit_per_shard, args.vit_items), args.vit_repeats, work,
                                                  args.seed, args.decode_workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    headline = "vit_b_32" if "vit_b_32" in results else next(iter(results))
    ratios = {
        "pipeline_vs_bare_encode": results[headline]["ratio_pipeline_vs_bare"],
        **{f"pipeline_vs_bare_encode_{k}": v["ratio_pipeline_vs_bare"] for k, v in results.items()},
        **{f"pipeline_vs_bare_encode_{k}_ratio_of_medians": v["ratio_of_median_items_per_s"]
           for k, v in results.items()},
        **{f"pipeline_vs_bare_encode_{k}_excluding_seal": v["ratio_excluding_seal"] for k, v in results.items()},
        "basis": f"headline = {headline}. Each ratio: median over alternating repeats of pipeline items/s / bare "
                 "items/s, the two passes of a pair back to back in one process with one Backbone object; "
                 "_ratio_of_medians: median pipeline items/s / median bare items/s; _excluding_seal: the "
                 "pipeline's wall time less sealing",
    }
    result = {
        "benchmark": "ingestion: whole build pipeline (embedded profile, in-process) vs bare backbone encoding",
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "method": {
            "data": "app.synthetic.write_wds: img2dataset-style tars, <key>.png (64x64 RGB) + .txt + .json",
            "pipeline": "start_build(rt, name, source, backbone=SPEC) + run_in_process(rt, id, show_progress=False),"
                        " wall time from start_build to ready: tar reading, decoding, preprocessing, encoding images "
                        "and captions, upserts into the embedded engine (qdrant-edge), metadata rows, sealing (one indexed "
                        "segment, no HNSW graph: both corpora are under Qdrant's 10 MB-per-vector full-scan "
                        "threshold and are searched exactly; search.py times HNSW builds)."
                        " RECO_HOME migrated once before timing; each timed build is a new version of one memory",
            "bare": "the same items in memory as (png bytes, caption): PIL decode + convert RGB, backbone.preprocess,"
                    " torch.stack, backbone.encode_image_tensor, backbone.encode_texts; serial, per batch of the "
                    "pipeline's batch size (app.ingest.encode_batch)",
            "shared": "one Backbone object (get_backbone's cache), model load excluded; one warm-up of each side",
            "timing": "pipeline and bare alternate (P B, B P, ...); the CPU may be shared with other jobs, so "
                      "ratios of adjacent passes are the figures to read, absolute items/s vary with the load",
            "check": "after the first pair, the stored vectors of every key are compared with the bare ones",
        },
        "models": results,
        "target": {"pipeline_vs_bare_encode": TARGET},
        "ratios": ratios,
        "target_met": {k: v["meets_target"] for k, v in results.items()},
    }
    out = Path(args.out)
    write_result(out, result)
    for k, v in results.items():
        log(f"{k}: pipeline {v['pipeline']['items_per_s_median']:.1f} items/s, bare "
            f"{v['bare']['items_per_s_median']:.1f} items/s -> x{v['ratio_pipeline_vs_bare']:.3f} "
            f"(target {TARGET}: {'met' if v['meets_target'] else 'not met'})")
    log(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
