"""Ingestion with 1 and 2 Celery worker processes on this machine (distributed profile: PostgreSQL + Redis, the
embedded vector engine shared through its file lock), and an estimate of a 100M-pair memory and 10M-pair
training run from the measured per-item costs.

    python benchmarks/scale.py [--model ViT-B-32] [--shards 8] [--per-shard 32] [--repeats 2]

Each pass starts N fresh `reco worker --queues ingest` processes, warms each one up (one shard per worker, so
model loading is outside the timing), then times `memory build` of the same corpus from the first enqueue to
`ready`. Passes alternate 1, 2, 2, 1, ... so load from other jobs hits both alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import synthetic  # noqa: E402
from benchmarks.common import log, machine, write_result  # noqa: E402

PG = os.environ.get("RECO_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS = os.environ.get("RECO_TEST_REDIS", "redis://127.0.0.1:6379/14")


def reco(env, *args) -> str:
    r = subprocess.run([sys.executable, "-m", "app", *map(str, args)], env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"reco {' '.join(map(str, args))} failed:\n{r.stderr[-2000:]}")
    return r.stdout


def wait_ready(env, name, version, timeout=1800) -> None:
    deadline = time.monotonic() + timeout
    while json.loads(reco(env, "memory", "show", name, "--version", version, "--json"))["status"] != "ready":
        if time.monotonic() > deadline:
            raise SystemExit(f"{name} v{version} not ready after {timeout} s")
        time.sleep(0.25)


def one_pass(env, workdir: Path, n_workers: int, corpus: Path, warm: Path, model: str, tag: str) -> dict:
    logs = [open(workdir / f"{tag}-w{i}.log", "w") for i in range(n_workers)]
    procs = [subprocess.Popen([sys.executable, "-m", "app", "worker", "-Q", "ingest", "-n", f"{tag}{i}@%h"],
                              env=env, stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        reco(env, "memory", "build", f"warm-{tag}", warm, "--backbone", model, "--no-wait")
        wait_ready(env, f"warm-{tag}", 1)
        t0 = time.perf_counter()
        reco(env, "memory", "build", f"scale-{tag}", corpus, "--backbone", model, "--no-wait")
        wait_ready(env, f"scale-{tag}", 1)
        wall = time.perf_counter() - t0
        shown = json.loads(reco(env, "memory", "show", f"scale-{tag}", "--json"))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    return {"workers": n_workers, "wall_s": wall, "items": shown["items_stored"],
            "items_per_s": shown["items_stored"] / wall}


def estimate(vit_items_per_s_2cores: float) -> dict:
    """A paper estimate from measured per-item costs (this machine) plus stated assumptions for a GPU cluster."""
    res = ROOT / "benchmarks" / "results"
    search = json.loads((res / "search.json").read_text())
    train = json.loads((res / "train.json").read_text())
    seal_s_per_100k = search["build"]["seal_s"]  # HNSW for both named vectors, 100k x 512, 2 cores
    knn_qps = search["hnsw_default"]["qps_median"]  # batched, 100k memory, 2 cores
    cached = train["configs"]["512d_1thread"]["variants"]
    steps_pairs_per_s = next(v["pairs_per_s_median"] for k, v in cached.items() if k.startswith("cached"))
    n_mem, n_train = 100e6, 10e6
    cpu_core_s_per_item = 2 / vit_items_per_s_2cores
    gpu_items_per_s = 1500.0  # assumption: ViT-B/32 image + text encoding on one RTX 3080/A10-class GPU, fp16
    hnsw_core_s = seal_s_per_100k * 2 * (n_mem / 1e5) * 1.6  # n log n growth from 1e5 to 1e8: x1.6 per item
    return {
        "assumptions": {
            "gpu_encode_items_per_s": gpu_items_per_s,
            "hnsw_cost_growth_100k_to_100M": "x1.6 per item (log n)",
            "knn_qps_at_100M_vs_100k": 0.33,
            "vectors": "2 named vectors x 512 float32 per item; int8 scalar quantization keeps a quarter in RAM",
        },
        "measured": {"vit_b_32_cpu_items_per_s_2cores": vit_items_per_s_2cores,
                     "hnsw_seal_s_per_100k_items_2cores": seal_s_per_100k, "knn_qps_100k_2cores": knn_qps,
                     "train_steps_pairs_per_s_1thread_d512": steps_pairs_per_s},
        "memory_100M": {
            "encode_cpu_core_hours": n_mem * cpu_core_s_per_item / 3600,
            "encode_gpu_hours": n_mem / gpu_items_per_s / 3600,
            "encode_wall_hours_8_gpus": n_mem / gpu_items_per_s / 3600 / 8,
            "hnsw_core_hours": hnsw_core_s / 3600,
            "hnsw_wall_hours_8_nodes_x_16_cores": hnsw_core_s / 3600 / (8 * 16),
            "vector_storage_gb_float32": n_mem * 2 * 512 * 4 / 1e9,
            "vector_ram_gb_int8": n_mem * 2 * 512 / 1e9,
        },
        "train_10M": {
            "knn_queries": 2 * n_train,
            "knn_core_hours": 2 * n_train / (knn_qps * 0.33) * 2 / 3600,
            "fusion_steps_cpu_core_hours_per_epoch": n_train / steps_pairs_per_s / 3600,
            "fusion_gpu_hours_per_epoch": n_train / (steps_pairs_per_s * 50) / 3600,  # assumption: a GPU ~50x
        },
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32", help="backbone spec (random weights when bare)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="pairs of passes (1 and 2 workers)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args(argv)

    import redis
    from sqlalchemy import create_engine, text

    started = dt.datetime.now(dt.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="reco-scale-"))
    db = f"reco_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{db}"'))
    redis.Redis.from_url(REDIS).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECO_")}
    env.update(RECO_HOME=str(work / "home"), RECO_DATABASE_URL=f"{PG}/{db}", RECO_BROKER_URL=REDIS,
               RECO_OFFLINE="1", HF_HUB_OFFLINE="1")
    try:
        reco(env, "db", "upgrade")
        corpus = synthetic.write_wds(work / "corpus", n_shards=args.shards, per_shard=args.per_shard)[0].parent
        warm = synthetic.write_wds(work / "warm", n_shards=2, per_shard=4, seed=9)[0].parent
        order = [n for i in range(args.repeats) for n in ((1, 2) if i % 2 == 0 else (2, 1))]
        passes = []
        for i, n in enumerate(order):
            p = one_pass(env, work, n, corpus, warm, args.model, f"p{i}n{n}")
            passes.append(p)
            log(f"{n} worker(s): {p['items_per_s']:.1f} items/s ({p['wall_s']:.1f} s)")
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    one = statistics.median(p["items_per_s"] for p in passes if p["workers"] == 1)
    two = statistics.median(p["items_per_s"] for p in passes if p["workers"] == 2)
    result = {
        "benchmark": "scale: ingestion items/s with 1 and 2 worker processes (PostgreSQL + Redis + embedded store)",
        "started": started.isoformat(), "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(()),
        "setup": {"model": args.model, "shards": args.shards, "per_shard": args.per_shard,
                  "items": args.shards * args.per_shard, "worker": "reco worker -Q ingest (solo pool, torch default "
                  "threads = cores), warmed up on a 2-shard build before timing"},
        "passes": passes,
        "items_per_s": {"one_worker": one, "two_workers": two},
        "ratios": {"two_workers_vs_one": two / one,
                   "basis": "median items/s with 2 workers / median with 1, passes alternating 1,2,2,1"},
        "limits": ("2 cores: one worker's torch already runs 2 intra-op threads, so a second process adds no "
                   "compute, only contention; writes to the embedded shard serialize on its file lock (short: "
                   "encoding happens outside it). On a machine with a core budget per worker, or a GPU per worker, "
                   "workers scale until the Qdrant server or PostgreSQL saturates."),
        "estimate": estimate(one),
    }
    out = write_result(args.out, result)
    log(f"{json.dumps(result['ratios'])} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
