"""RECO on one GPU, measured through the product's own code: ingest, training, the drop-in model's encode, text
encode, exact kNN on the device and the fast tests under RECO_DEVICE=cuda, into benchmarks/results/gpu.json.

    python benchmarks/gpu.py [--device cuda] [--steps ingest,train,encode,knn,tests] [--memory-size 1000000]
                             [--precision tf32] [--out benchmarks/results/gpu.json]
    python benchmarks/gpu.py --tiny --device cpu --out /tmp/gpu.json      (every path at toy sizes, any machine)
    make bench-gpu                                       (benchmarks/gpu_device.sh on a GPU machine without network)

Without --tiny it refuses to run anywhere but CUDA, so results/gpu.json only ever holds GPU numbers; --tiny uses
the tiny open_clip config and small sizes and must write elsewhere (--out). Every figure is measured in this run;
a step that fails or is skipped records why and leaves its headline figure null. The file is rewritten after
each step, so a run cut short keeps what it measured.

  setup   a fresh RECO_HOME (embedded profile: SQLite + qdrant-edge; RECO_DECODE_WORKERS, RECO_ENCODE_BATCH,
          RECO_DEVICE_SEARCH and RECO_SEARCH_THREADS kept from the environment and recorded), RECO_DEVICE = the
          device. Memory `mem` of --memory-size synthetic 512-d pairs and memory `pairs` of --pairs pairs (clip-
          retrieval layout, app.synthetic.write_embeddings) built with start_build + run_in_process, as
          `reco memory build` does; build times recorded.
  ingest  ingest_items_per_s: 500x375 JPEGs (app.synthetic drawings; a pool of distinct images cycled under
          distinct keys and captions) in WebDataset tars -> a ready version through start_build + run_in_process,
          backbone ViT-B-32 (random seeded weights), wall time from start_build to the sealed version. A probe
          build first (loads the backbone, warms the device) sizes the measured one to about --ingest-seconds.
  train   a model `enc` (pairs -> mem, k=10, batch 256, 1 epoch) through create_job + run_training: the real
          neighbour pull, timed. Then batch 4096 (--precision passed to TrainConfig when it has the field):
          run_training with load_pairs / NeighbourCache.get returning the real pairs and neighbours tiled to
          R rows, so the product's step loop runs on R rows without an R-row pull. Step times are on_step
          timestamps (each step ends in loss.item(), a device sync); steps that validate or checkpoint and the
          first --warm steps are left out. train_pairs_per_s_b4096 = pairs / seconds over the kept steps at the
          larger R; epoch_10m_min = 10e6 / that / 60. Per-step cost against rows: the median step at R and at
          10 R; a ratio near 1 means no per-step work grows with the rows (one permutation per epoch).
  encode  reco_encode_vs_bare_b256: app.clip_model.create_model('reco:enc', device=...) encode_image of a batch
          of 256 resident on the device (tower + retrieval from the --memory-size memory + fusion) against the
          bare tower (model.clip.encode_image) at the same precision (float16 autocast on CUDA, as the drop-in
          model runs it), medians of synchronised calls, ratio = bare median / reco median (items/s ratio).
          Text at batch 1024: RecoEncoder.encode_text (tokenizer + tower + retrieval + fusion) and the drop-in's
          encode_text of tokens against the tower alone on resident tokens.
  knn     exact kNN on the device over the memory's own vectors (torch matmul + topk, float16, query chunks).
  tests   pytest -m "not slow" of the device-sensitive test files with RECO_DEVICE set: pass/fail counts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to download
os.environ["RECO_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import build_ready, log, machine, write_result  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.json"
STEPS = ("ingest", "train", "encode", "knn", "tests")
TARGETS = {"ingest_items_per_s": (">=", 5000), "train_pairs_per_s_b4096": (">=", 150_000),
           "epoch_10m_min": ("<=", 2), "reco_encode_vs_bare_b256": (">=", 0.7)}
TEST_FILES = ["tests/test_fusion.py", "tests/test_train.py", "tests/test_clip_model.py", "tests/test_backbone.py",
              "tests/test_device_search.py", "tests/test_decode.py"]
KEEP_ENV = ("RECO_OFFLINE", "RECO_DECODE_WORKERS", "RECO_ENCODE_BATCH", "RECO_DEVICE_SEARCH", "RECO_SEARCH_THREADS")
GPU = dict(memory_size=1_000_000, pairs=20_000, ingest_probe=1024, ingest_min=4096, ingest_max=100_000,
           per_shard=2048, jpeg_pool=256, train_batch=4096, rows=200_000, timed_steps=30, warm=3,
           enc_batch=256, text_batch=1024, calls=(3, 10), knn_queries=10_000)
TINY = dict(memory_size=2000, pairs=256, ingest_probe=16, ingest_min=32, ingest_max=32, per_shard=16,
            jpeg_pool=8, train_batch=64, rows=1024, timed_steps=8, warm=2, enc_batch=8, text_batch=16,
            calls=(1, 3), knn_queries=64)


class Stop(Exception):
    """Raised from on_step: enough steps were timed (the throwaway job is left unfinished)."""


class Result:
    """The output file, rewritten whole after every step."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        write_result(tmp, self.data)
        os.replace(tmp, self.path)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_calls(fn, device: str, warm: int, timed: int) -> dict:
    for _ in range(warm):
        fn()
    sync(device)
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_ms": round(1000 * statistics.median(times), 3), "min_ms": round(1000 * min(times), 3),
            "calls": timed}


def rate(t: dict, n: int) -> dict:
    return {"items_per_s": round(n / (t["median_ms"] / 1000), 1), "batch": n, **t}


def commit() -> dict:
    """The checkout measured: git when it is there, else what benchmarks/gpu_wheels.sh recorded beside the wheels
    (a GPU machine gets the working tree without .git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return {"commit": sha, "dirty": bool(dirty), "from": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    f = ROOT / ".gpuwheels" / "COMMIT"
    if f.is_file():
        sha, _, dirty = f.read_text().strip().partition(" ")
        return {"commit": sha, "dirty": dirty == "dirty", "from": ".gpuwheels/COMMIT (written by gpu_wheels.sh)"}
    return {"commit": os.environ.get("RECO_COMMIT") or None, "from": "RECO_COMMIT" if os.environ.get("RECO_COMMIT")
            else "unknown"}


def fresh_runtime(home: Path, device: str):
    from app.runtime import Runtime
    from app.settings import ENV_VARS, Settings

    for var in ENV_VARS:  # the embedded profile here, whatever else is configured; throughput knobs stay
        if var not in KEEP_ENV:
            os.environ.pop(var, None)
    os.environ.update(RECO_HOME=str(home), RECO_DEVICE=device)
    return Runtime(Settings.from_env())


def build(rt, name: str, source: Path, spec: str) -> dict:
    wall, row = build_ready(rt, name, source, spec)
    return {"items": row["items"], "skipped": row["skipped"], "build_s": round(wall, 2),
            "items_per_s": round(row["items"] / wall, 1)}


# -- setup: the memories training and encoding read ---------------------------------------------------------
def setup(rt, sz: dict, work: Path, spec: str, dim: int) -> dict:
    from app import synthetic

    out = {}
    for name, n, seed in (("mem", sz["memory_size"], 0), ("pairs", sz["pairs"], 7)):
        per = min(n, 50_000)
        t0 = time.perf_counter()
        src = synthetic.write_embeddings(work / f"src-{name}", -(-n // per), per, dim, seed=seed)
        written = time.perf_counter() - t0
        out[name] = {"write_embeddings_s": round(written, 2), **build(rt, name, src, spec)}
        shutil.rmtree(src, ignore_errors=True)
        log(f"setup: memory {name} {out[name]}")
    return out


# -- ingest ---------------------------------------------------------------------------------------------------
def write_jpeg_wds(root: Path, n: int, per_shard: int, pool: int, seed: int) -> dict:
    """img2dataset-style tars of 500x375 JPEGs (quality 90): `pool` distinct drawings cycled under n keys."""
    from PIL import Image

    from app import synthetic

    root.mkdir(parents=True, exist_ok=True)
    jpegs = []
    for i in range(min(pool, n)):
        square = synthetic.render(*synthetic.concept(i), size=375, seed=seed + i, jitter=1.0)
        canvas = Image.new("RGB", (500, 375), (118, 124, 130))
        canvas.paste(square, (62 + (i % 5) * 10, 0))
        b = io.BytesIO()
        canvas.save(b, "JPEG", quality=90)
        jpegs.append(b.getvalue())
    for s in range(-(-n // per_shard)):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                key, cap = f"{seed:03d}{i:08d}", f"a {' '.join(synthetic.concept(i))}, photo {i}"
                synthetic._add(tar, f"{key}.jpg", jpegs[i % len(jpegs)])
                synthetic._add(tar, f"{key}.txt", cap.encode())
                synthetic._add(tar, f"{key}.json", json.dumps({"key": key, "caption": cap}).encode())
    return {"images": n, "distinct_jpegs": len(jpegs), "jpeg_kb_mean": round(np.mean([len(j) for j in jpegs]) / 1024, 1),
            "size_px": [500, 375], "shards": -(-n // per_shard), "per_shard": per_shard}


def step_ingest(rt, sz: dict, work: Path, spec: str, budget_s: float) -> dict:
    out = {"backbone": spec, "settings": {k: getattr(rt.settings, k, None)
                                          for k in ("decode_workers", "encode_batch", "device")}}
    with contextlib.suppress(Exception):  # what "auto" resolved to, where the code exposes it
        from app.ingest import encode_batch

        out["settings"]["encode_batch_resolved"] = encode_batch(rt.settings.encode_batch, rt.settings.device)
    with contextlib.suppress(Exception):
        from app.decode import decode_workers

        out["settings"]["decode_workers_resolved"] = decode_workers(rt.settings.decode_workers, rt.settings.device)
    src = work / "jpeg-probe"
    out["probe_data"] = write_jpeg_wds(src, sz["ingest_probe"], sz["per_shard"], sz["jpeg_pool"], seed=1)
    out["probe"] = build(rt, "ingestprobe", src, spec)  # loads the backbone, warms the device
    shutil.rmtree(src, ignore_errors=True)
    n = int(min(sz["ingest_max"], max(sz["ingest_min"], out["probe"]["items_per_s"] * budget_s)))
    src = work / "jpeg"
    t0 = time.perf_counter()
    out["data"] = write_jpeg_wds(src, n, sz["per_shard"], sz["jpeg_pool"], seed=2)
    out["data"]["write_s"] = round(time.perf_counter() - t0, 2)
    out["measured"] = build(rt, "ingest", src, spec)
    shutil.rmtree(src, ignore_errors=True)
    out["ingest_items_per_s"] = out["measured"]["items_per_s"]
    out["how"] = ("items stored / wall seconds of start_build + run_in_process (decode, preprocess, encode, store, "
                  "seal) for the measured build; the probe build before it sized it")
    log(f"ingest: {out['measured']}")
    return out


# -- training -------------------------------------------------------------------------------------------------
def tile_pairs(p, rows: int):
    from app.train import Pairs

    reps = -(-rows // len(p.ids))
    ids = [f"{i}-{r}" for r in range(reps) for i in p.ids][:rows]
    return Pairs(ids, (p.captions * reps)[:rows], np.tile(p.image, (reps, 1))[:rows],
                 np.tile(p.text, (reps, 1))[:rows])


def tile_neighbours(nb: dict, rows: int) -> dict:
    from app.train import SideNeighbours

    out = {}
    for side, n in nb.items():
        reps = -(-rows // len(n.idx))
        out[side] = SideNeighbours(np.tile(n.idx, (reps, 1))[:rows], np.tile(n.scores, (reps, 1))[:rows],
                                   np.tile(n.mask, (reps, 1))[:rows], n.table, n.ids)
    return out


def train_config(args, **kw):
    from app.train import TrainConfig

    cfg = TrainConfig(k=10, epochs=1, dedup_threshold=0.98, **kw)
    if "precision" in {f.name for f in dataclasses.fields(TrainConfig)}:
        cfg.precision = args.precision
    return cfg


def timed_run(rt, name: str, cfg, pairs, nbrs, rows: int, sz: dict) -> dict:
    """run_training of `name` on `rows` tiled rows, stopped after warm + timed_steps kept steps."""
    import app.train
    from app.train import NeighbourCache, create_job, run_training

    tp, tn = tile_pairs(pairs, rows), tile_neighbours(nbrs, rows)
    create_job(rt, name, "pairs", "mem", cfg)
    stamps: list[tuple[int, float]] = []
    n_train = len(app.train.split(tp, cfg)[0])
    spe = max(1, n_train // min(cfg.batch_size, n_train))
    want = sz["warm"] + sz["timed_steps"]

    def on_step(step: int) -> None:
        stamps.append((step, time.perf_counter()))
        if sum(1 for s, _ in stamps[1:] if s % spe) >= want:
            raise Stop

    with contextlib.ExitStack() as st:
        orig_load, orig_get = app.train.load_pairs, NeighbourCache.get
        app.train.load_pairs = lambda *a, **k: tp
        NeighbourCache.get = lambda self, *a, **k: tn
        st.callback(setattr, app.train, "load_pairs", orig_load)
        st.callback(setattr, NeighbourCache, "get", orig_get)
        t0 = time.perf_counter()
        with contextlib.suppress(Stop):
            run_training(rt, name, progress=False, on_step=on_step)
        wall = time.perf_counter() - t0
    # step s's interval ends at its on_step; it holds a validation + checkpoint when s ends an epoch (s % spe == 0)
    secs = [t - t_prev for (_, t_prev), (s, t) in zip(stamps, stamps[1:]) if s % spe][sz["warm"]:]
    bs = min(cfg.batch_size, n_train)
    res = {"rows": rows, "train_rows": n_train, "steps_per_epoch": spe, "batch": bs, "kept_steps": len(secs),
           "step_ms_median": round(1000 * statistics.median(secs), 3) if secs else None,
           "step_ms_min": round(1000 * min(secs), 3) if secs else None,
           "pairs_per_s": round(bs * len(secs) / sum(secs), 1) if secs else None,
           "wall_s": round(wall, 2)}
    if torch.cuda.is_available():
        res["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def step_train(rt, args, sz: dict) -> dict:
    import app.train
    from app.train import NeighbourCache, create_job, run_training

    out: dict = {"precision": args.precision if "precision" in {f.name for f in dataclasses.fields(
        app.train.TrainConfig)} else "fp32 (TrainConfig has no precision field at this commit)"}
    got: dict = {}
    orig_load, orig_get = app.train.load_pairs, NeighbourCache.get

    def keep_load(*a, **k):
        got["pairs"] = orig_load(*a, **k)
        return got["pairs"]

    def keep_get(self, *a, **k):
        t0 = time.perf_counter()
        got["nbrs"] = orig_get(self, *a, **k)
        got["pull_s"] = time.perf_counter() - t0
        return got["nbrs"]

    app.train.load_pairs, NeighbourCache.get = keep_load, keep_get
    try:
        t0 = time.perf_counter()
        create_job(rt, "enc", "pairs", "mem", train_config(args, batch_size=256))
        m = run_training(rt, "enc", progress=False)
    finally:
        app.train.load_pairs, NeighbourCache.get = orig_load, orig_get
    out["enc_model"] = {"pairs": len(got["pairs"].ids), "train_s": round(time.perf_counter() - t0, 2),
                        "neighbour_pull_s": round(got["pull_s"], 2), "store_queries": m["store_queries"],
                        "steps": m["steps"], "batch": 256}
    log(f"train: model enc {out['enc_model']}")
    bs = sz["train_batch"]
    cfg = train_config(args, batch_size=bs, checkpoint_every=10**9)
    r1 = max(sz["rows"], 4 * bs)
    small = timed_run(rt, "t-small", cfg, got["pairs"], got["nbrs"], r1, sz)
    log(f"train b{bs} at {r1} rows: {small}")
    big = timed_run(rt, "t-big", cfg, got["pairs"], got["nbrs"], 10 * r1, sz)
    log(f"train b{bs} at {10 * r1} rows: {big}")
    out[f"b{bs}"] = {"rows_small": small, "rows_10x": big}
    ratio = big["step_ms_median"] / small["step_ms_median"] if small["step_ms_median"] else None
    out["per_step_cost_vs_rows"] = {
        "ratio_median_step_10x_rows": round(ratio, 3) if ratio else None,
        "flat": bool(ratio is not None and ratio <= 1.25),
        "how": (f"median step time of run_training at {r1} and {10 * r1} rows (the real pairs and neighbours "
                "tiled), same batch and model: work done per step over all rows (a permutation per step) would "
                "make the 10x run's steps slower; <= 1.25 counts as flat"),
    }
    out["train_pairs_per_s_b4096"] = big["pairs_per_s"]
    out["epoch_10m_min"] = round(10e6 / big["pairs_per_s"] / 60, 3) if big["pairs_per_s"] else None
    out["how"] = ("pairs/s over the kept steps of the 10x-rows run (warm-up and validating steps left out; the "
                  "neighbour pull is not in the step loop: it is the enc model's neighbour_pull_s)")
    return out


# -- encode ---------------------------------------------------------------------------------------------------
def step_encode(rt, device: str, sz: dict) -> dict:
    from app import clip_model
    from app.encoder import Timing

    out: dict = {}
    t0 = time.perf_counter()
    model = clip_model.create_model("reco:enc", runtime=rt, device=device)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    enc = model.encoder
    dev = model.device
    warm, timed = sz["calls"]
    b = sz["enc_batch"]
    size = model.clip.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    px = torch.randn(b, 3, *size, device=dev)
    splits = []

    def reco():
        enc.timing = Timing()
        model.encode_image(px)
        splits.append((enc.timing.search, enc.timing.fuse))

    try:
        out[f"reco_encode_image_b{b}"] = rate(median_calls(reco, device, warm, timed), b)
        s = splits[warm:]
        out[f"reco_encode_image_b{b}"].update(search_ms_median=round(1000 * statistics.median(x for x, _ in s), 3),
                                              fuse_ms_median=round(1000 * statistics.median(y for _, y in s), 3))
        with torch.no_grad():
            def bare():
                with model._precision(dev):
                    model.clip.encode_image(px, normalize=True)
            out[f"bare_tower_b{b}"] = rate(median_calls(bare, device, warm, timed), b)
        out["precision"] = "float16 autocast" if dev.type == "cuda" else "float32"
        out["reco_encode_vs_bare_b256"] = round(out[f"bare_tower_b{b}"]["median_ms"]
                                                / out[f"reco_encode_image_b{b}"]["median_ms"], 3)
        log(f"encode: reco {out[f'reco_encode_image_b{b}']} bare {out[f'bare_tower_b{b}']}")
        from app import synthetic

        tb = sz["text_batch"]
        caps = [f"a photo of a {' '.join(synthetic.concept(i))}, number {i}" for i in range(tb)]
        tokens = enc.backbone.tokenizer(caps)
        on_dev = tokens.to(dev)
        out[f"text_reco_encoder_b{tb}"] = rate(median_calls(lambda: enc.encode_text(caps), device, warm, timed), tb)
        out[f"text_drop_in_tokens_b{tb}"] = rate(median_calls(lambda: model.encode_text(on_dev), device, warm,
                                                              timed), tb)
        out[f"tokenizer_b{tb}"] = rate(median_calls(lambda: enc.backbone.tokenizer(caps), device, 0, timed), tb)
        with torch.no_grad():
            def tower():
                with model._precision(dev):
                    model.clip.encode_text(on_dev, normalize=True)
            out[f"text_tower_b{tb}"] = rate(median_calls(tower, device, warm, timed), tb)
        out["text_reco_vs_tower"] = round(out[f"text_tower_b{tb}"]["median_ms"]
                                          / out[f"text_reco_encoder_b{tb}"]["median_ms"], 3)
        out["encoder"] = {"device": enc.device, "k": enc.k, "memory": enc.memory,
                          "device_search": getattr(rt.settings, "device_search", None)}
        out["how"] = ("ratio = bare median / reco median at the same batch (1.0: retrieval costs nothing); inputs "
                      "resident on the device for both")
    finally:
        enc.close()
    return out


# -- exact kNN ------------------------------------------------------------------------------------------------
def step_knn(device: str, sz: dict, dim: int) -> dict:
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(sz["memory_size"], dim, device=device, generator=gen), dim=1)
    db = db.to(dtype)
    q = db[torch.randperm(len(db), generator=torch.Generator().manual_seed(0))[: sz["knn_queries"]].to(device)]
    chunk = max(1, (1 << 30) // (2 * len(db)))  # scores of a chunk under 1 GiB

    def search():
        for a in range(0, len(q), chunk):
            (q[a : a + chunk] @ db.T).topk(10, dim=1)

    t = median_calls(search, device, 1, 3)
    qps = len(q) / (t["median_ms"] / 1000)
    return {"memory": len(db), "queries": len(q), "k": 10, "dtype": str(dtype), "query_chunk": chunk,
            "queries_per_s": round(qps, 1), **t,
            "how": "torch matmul + topk over --memory-size random unit vectors on the device (exact; the kNN cost "
                   "of a memory that size, not the product path)"}


# -- tests ----------------------------------------------------------------------------------------------------
def step_tests(device: str, out_dir: Path, limit_s: float) -> dict:
    import xml.etree.ElementTree as ET

    files = [f for f in TEST_FILES if (ROOT / f).is_file()]
    junit = out_dir / "gpu-junit.xml"
    env = {**os.environ, "RECO_DEVICE": device}
    for var in ("RECO_HOME",):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", "-m", "not slow",
           f"--junitxml={junit}", *files]
    out = {"files": files, "missing": [f for f in TEST_FILES if f not in files], "device": device,
           "command": f"RECO_DEVICE={device} python -m pytest -m 'not slow' " + " ".join(files)}
    t0 = time.perf_counter()
    log_path = out_dir / "gpu-pytest.txt"
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            out["rc"] = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:  # SIGINT first: pytest then writes its summary and the junit file
            out["timed_out_s"] = limit_s
            proc.send_signal(signal.SIGINT)
            try:
                out["rc"] = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out["rc"] = proc.wait()
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    out["tail"] = log_path.read_text(errors="replace")[-2000:]
    if junit.is_file():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        out.update(counts, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"])
        out["not_passed"] = [{"test": f"{c.get('classname')}::{c.get('name')}", "message": (e.get("message") or "")[:300]}
                             for c in suite.iter("testcase") for e in (c.find("failure"), c.find("error"))
                             if e is not None]
    log(f"tests: rc {out['rc']} passed {out.get('passed')} failed {out.get('failures')} errors {out.get('errors')}")
    return out


# -- main -----------------------------------------------------------------------------------------------------
def headline(data: dict, device: str) -> dict:
    h = {"ingest_items_per_s": data.get("ingest", {}).get("ingest_items_per_s"),
         "train_pairs_per_s_b4096": data.get("train", {}).get("train_pairs_per_s_b4096"),
         "epoch_10m_min": data.get("train", {}).get("epoch_10m_min"),
         "reco_encode_vs_bare_b256": data.get("encode", {}).get("reco_encode_vs_bare_b256"),
         "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
         "commit": data.get("checkout", {}).get("commit")}
    return h


def targets(h: dict) -> dict:
    out = {}
    for key, (op, goal) in TARGETS.items():
        v = h.get(key)
        ok = None if v is None else (v >= goal if op == ">=" else v <= goal)
        out[key] = {"target": f"{op} {goal}", "value": v, "pass": ok}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes (a smoke test, any device)")
    p.add_argument("--out", default=None, help=f"default {DEFAULT_OUT.relative_to(ROOT)} (not with --tiny)")
    p.add_argument("--steps", default=None, help=f"comma list of {','.join(STEPS)} (default all; --tiny: no tests)")
    p.add_argument("--memory-size", type=int, default=None, help="items of the memory encode and training read")
    p.add_argument("--pairs", type=int, default=None, help="pairs of the model `enc` (the real neighbour pull)")
    p.add_argument("--precision", default=None, choices=("fp32", "tf32", "bf16"),
                   help="TrainConfig.precision where it exists (default tf32 on CUDA, fp32 elsewhere)")
    p.add_argument("--ingest-seconds", type=float, default=30.0, help="about how long the measured ingest runs")
    p.add_argument("--logs", default=None, help="where the tests step leaves gpu-pytest.txt and gpu-junit.xml "
                   "(default: a temporary directory, removed)")
    p.add_argument("--tests-limit", type=float, default=300.0, help="seconds the test run may take")
    p.add_argument("--merge", action="store_true", help="keep the other steps already in --out")
    p.add_argument("--workdir", default=None, help="parent of the temporary directory")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    out = Path(args.out).resolve() if args.out else DEFAULT_OUT
    if not args.tiny and not (cuda and torch.cuda.is_available()):
        print(f"benchmarks/gpu.py measures a CUDA device (device {args.device!r}, CUDA "
              f"{'available' if torch.cuda.is_available() else 'not available'}): nothing written; use --tiny "
              f"--out PATH for a smoke test", file=sys.stderr)
        return 2
    if args.tiny and out == DEFAULT_OUT.resolve():
        print(f"--tiny numbers never go to {DEFAULT_OUT.relative_to(ROOT)}: pass --out elsewhere", file=sys.stderr)
        return 2
    if cuda and not torch.cuda.is_available():
        print(f"device {args.device!r} but CUDA is not available here", file=sys.stderr)
        return 2
    sz = dict(TINY if args.tiny else GPU)
    for key in ("memory_size", "pairs"):
        if getattr(args, key) is not None:
            sz[key] = getattr(args, key)
    args.precision = args.precision or ("tf32" if cuda else "fp32")
    steps = [s for s in (args.steps.split(",") if args.steps else STEPS) if s]
    if args.tiny and not args.steps:
        steps = [s for s in STEPS if s != "tests"]
    if bad := set(steps) - set(STEPS):
        print(f"--steps: unknown {', '.join(sorted(bad))} (known: {', '.join(STEPS)})", file=sys.stderr)
        return 2

    from app import synthetic

    work = Path(tempfile.mkdtemp(prefix="reco-gpu-", dir=args.workdir))
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {}
    if args.merge and out.is_file():  # another invocation's steps stay (a run split in two, each under a timeout)
        redo = set(steps) | ({"setup"} if {"train", "encode"} & set(steps) else set())
        data = {k: v for k, v in json.loads(out.read_text()).items() if k not in redo}
    data.update({"benchmark": "gpu", "tiny": args.tiny, "device": args.device, "sizes": sz, "checkout": commit(),
                 "path": "through the product's code: app.build, app.train, app.clip_model, app.encoder"})
    data.setdefault("runs", []).append({"steps": steps, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    res = Result(out, data)
    if cuda:
        props = torch.cuda.get_device_properties(0)
        res.data["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                           "capability": f"{props.major}.{props.minor}", "torch_cuda": torch.version.cuda}
    spec = str(synthetic.write_tiny_config(work / "tiny-clip.json")) if args.tiny else "ViT-B-32"
    dim = 64 if args.tiny else 512
    res.data["backbone"] = "tiny open_clip config (app.synthetic)" if args.tiny else "ViT-B-32 (random seeded weights)"
    rt = fresh_runtime(work / "home", args.device)
    res.data["settings"] = rt.settings.describe()
    failed = []
    try:
        for step in steps:
            if step in ("train", "encode") and "setup" not in res.data:
                t0 = time.perf_counter()
                try:
                    res.put("setup", setup(rt, sz, work, spec, dim))
                except Exception as exc:  # noqa: BLE001 - recorded; the steps that need it are skipped
                    res.put("setup", {"error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()[-2000:]})
                    failed.append("setup")
                res.data["setup"]["wall_s"] = round(time.perf_counter() - t0, 1)
            if step in ("train", "encode") and "setup" in failed or step == "encode" and "train" in failed:
                res.put(step, {"skipped": "setup or train failed"})
                continue
            t0 = time.perf_counter()
            log(f"{step} ...")
            try:
                if step == "ingest":
                    value = step_ingest(rt, sz, work, spec, args.ingest_seconds)
                elif step == "train":
                    value = step_train(rt, args, sz)
                elif step == "encode":
                    if "train" not in steps:
                        raise RuntimeError("encode reads the model the train step makes: run them together")
                    value = step_encode(rt, args.device, sz)
                elif step == "knn":
                    value = step_knn(args.device, sz, dim)
                else:
                    logs = Path(args.logs) if args.logs else work
                    logs.mkdir(parents=True, exist_ok=True)
                    value = step_tests(args.device, logs, args.tests_limit)
            except Exception as exc:  # noqa: BLE001 - recorded, the other steps still run
                value = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
                failed.append(step)
                log(f"{step}: ERROR {value['error']}")
            value["wall_s"] = round(time.perf_counter() - t0, 1)
            res.put(step, value)
    finally:
        rt.close()
        shutil.rmtree(work, ignore_errors=True)
        res.data["machine"] = machine()
        h = headline(res.data, args.device)
        res.data["headline"] = h
        res.data["targets"] = targets(h)
        res.data["runs"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        res.save()
    log(f"headline {json.dumps(h)} -> {out}")
    for key, t in res.data["targets"].items():
        log(f"  {key}: {t['value']} (target {t['target']}): {'pass' if t['pass'] else 'FAIL' if t['pass'] is False else 'not measured'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
