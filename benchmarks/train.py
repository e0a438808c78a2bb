"""Training throughput: pairs/s when the neighbours come from the store (first epoch), from the disk cache
(reruns) and from RAM, over the same steps, in one run.

    python benchmarks/train.py [--pairs 20000] [--dims 512,64] [--repeats 3] [--memory-size N [--home DIR]]
                               [--out benchmarks/results/train.json]

Memory: `--pairs` image-text pairs of precomputed embeddings in clip-retrieval's layout (float16 .npy + parquet
metadata), built through the product (`start_build` + `run_in_process`, format `embeddings`: no backbone runs) into
a fresh RECO_HOME, then sealed (HNSW) and activated. The backbone spec only names the embedding space: ViT-B-32
(random weights) for 512-d, the tiny config of app.synthetic for 64-d. Vectors are CLIP-like by default (unit
vectors around ~n/100 cluster centres, the generator of benchmarks/search.py; text = image + a second clustered
draw, renormalised) or iid random with `--data random` (app.synthetic.write_embeddings; the HNSW worst case).

Training: the pairs are the memory (`create_job(rt, model, "bench", "bench", cfg)`), so every pair excludes its own
item; with `--memory-size N` the neighbours come instead from a separate memory `mem` of N items (built here, or
the one `benchmarks/inference.py --home H --memory-size N` left in H, given `--home H`); TrainConfig defaults (k=10, batch 256, uni-modal search, cross-modal fusion, dedup 0.98, 10% validation
held out by concept), except epochs=1. Each measured run is one `run_training` call (a new model each time):

  first   the neighbour cache is deleted first: batched kNN queries to the embedded store, both sides, every
          pair (train and validation), then one epoch of steps;
  cached  the neighbours are read from the disk cache a previous run wrote (a rerun, another model on the same
          pairs and memory, a resumed job), then one epoch;
  in_ram  NeighbourCache.get is replaced by a function returning the same arrays already in RAM (no store, no
          cache I/O), then one epoch.

All three load the pairs from their disk cache (the store scan of the pairs happens once, at setup; its time
is reported) and run the same seeded steps, end-of-epoch validation and checkpoint: only where the neighbours
come from differs (the final losses are checked to be identical). pairs/s = pairs trained in the epoch (steps x
batch size) / wall seconds of run_training. The variants alternate in a rotating order repeat by repeat, so
that load from other jobs on the machine hits all alike; ratios are of the medians (and per repeat).
Targets: cached >= 0.9x in_ram, first >= 0.5x in_ram.

Data path (`--data-path`, instead of the above; no store, seconds): how each step's batch is made, the old way (a
full `rng.permutation(train_rows)` every step, neighbours gathered in host numpy and copied) against the new one
(one permutation per epoch, data placed once by `place_data`, the batch indexed where it lives), over the same
rows; the forward and backward, the same in both, are left out. The batches are checked to be identical.

    python benchmarks/train.py --data-path [--path-rows 1000000] [--path-device cpu|cuda] [--batch 4096]

Threads: the headline runs torch with 1 intra-op thread; torch's default (one per core) is run too, interleaved,
and reported beside it. On a small machine shared with other jobs, two OpenMP threads stall whenever one is
descheduled (the same in_ram epoch was measured from 0.15 s to 6.4 s), which drowns the differences measured
here; one thread gives repeatable figures. The kNN engine is single-threaded either way (it holds the GIL), so
steps that could use more cores than one would make the first epoch's share of kNN larger than measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing to download: embeddings only
os.environ["RECO_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import build_ready, log, machine, write_result  # noqa: E402
import app.checkpoint  # noqa: E402
import app.train  # noqa: E402
from app import synthetic  # noqa: E402
from app.db.models import FusionModel  # noqa: E402
from app.runtime import Runtime  # noqa: E402
from app.settings import ENV_VARS, Settings  # noqa: E402
from app.train import NeighbourCache, TrainConfig, create_job, load_pairs, run_training  # noqa: E402

TARGETS = {"cached_vs_in_ram": 0.9, "first_epoch_vs_in_ram": 0.5}
VARIANTS = ("first", "cached", "in_ram")
MEMORY = "bench"


# -- data ------------------------------------------------------------------------------------------------
def write_embeddings(root: Path, n: int, dim: int, data: str, seed: int, per_part: int = 10_000) -> int:
    """clip-retrieval layout under root; returns the number of pairs written."""
    if data == "random":
        parts = max(1, math.ceil(n / per_part))
        per = math.ceil(n / parts)
        synthetic.write_embeddings(root, parts, per, dim=dim, seed=seed)
        return parts * per
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.search import clustered

    gen = dict(clusters=min(1000, max(1, n // 100)), centre_rank=128, cluster_rank=48, mean_weight=0.5,
               spread=0.6, iso_noise=0.15)
    img = clustered(n, dim, seed=seed, **gen)
    txt = img + 0.7 * clustered(n, dim, seed=seed + 1, **gen)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for p, a in enumerate(range(0, n, per_part)):
        b = min(n, a + per_part)
        np.save(root / "img_emb" / f"img_emb_{p}.npy", img[a:b].astype(np.float16))
        np.save(root / "text_emb" / f"text_emb_{p}.npy", txt[a:b].astype(np.float16))
        caps = ["a " + " ".join(synthetic.concept(i)) for i in range(a, b)]
        pq.write_table(pa.table({"key": [f"{i:08d}" for i in range(a, b)], "caption": caps}),
                       root / "metadata" / f"metadata_{p}.parquet")
    return n


def backbone_spec(dim: int, work: Path) -> str:
    if dim == 64:
        return str(synthetic.write_tiny_config(work / "tiny-clip.json"))
    specs = {512: "ViT-B-32", 768: "ViT-L-14"}
    if dim not in specs:
        raise SystemExit(f"--dims: {dim} is not one of 64, 512, 768")
    return specs[dim]


def fresh_runtime(home: Path) -> Runtime:
    for var in ENV_VARS:
        if var != "RECO_OFFLINE":
            os.environ.pop(var, None)
    os.environ["RECO_HOME"] = str(home)
    return Runtime(Settings.from_env())


def build_memory(rt: Runtime, source: Path, spec: str, name: str = MEMORY) -> dict:
    wall, row = build_ready(rt, name, source, spec)
    return {"build_s": wall, "items": row["items"], "collection": row["collection"], "backbone": row["backbone"]}


# -- instrumentation ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def patched(obj, attr: str, fn):
    orig = getattr(obj, attr)
    setattr(obj, attr, fn)
    try:
        yield orig
    finally:
        setattr(obj, attr, orig)


def timed(fn, times: dict, label: str):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - t0

    return wrapper


def run_variant(rt: Runtime, variant: str, model: str, cfg: TrainConfig, cache_dir: Path, nb_ram: dict,
                memory: str = MEMORY) -> dict:
    """One run_training call of one epoch; wall time and where it went."""
    if variant == "first":
        shutil.rmtree(cache_dir, ignore_errors=True)  # nothing cached: the neighbours come from the store
    elif not (cache_dir / "done").is_file():
        raise SystemExit(f"the neighbour cache {cache_dir} should exist before a {variant} run")
    create_job(rt, model, MEMORY, memory, cfg)
    tm: dict[str, float] = {}
    get = NeighbourCache.get
    if variant == "in_ram":
        def get(self, pairs, *a, **k):  # noqa: ARG001 - the neighbours are already in RAM
            return nb_ram
    with contextlib.ExitStack() as st:
        st.enter_context(patched(NeighbourCache, "get", timed(get, tm, "neighbours_s")))
        st.enter_context(patched(app.train, "load_pairs", timed(app.train.load_pairs, tm, "pairs_s")))
        st.enter_context(patched(app.train, "evaluate", timed(app.train.evaluate, tm, "eval_s")))
        st.enter_context(patched(app.checkpoint, "save", timed(app.checkpoint.save, tm, "checkpoint_s")))
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = run_training(rt, model, progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    with rt.db.session() as s:
        ckdir = Path(s.query(FusionModel).filter_by(name=model).one().checkpoint_dir)
    shutil.rmtree(ckdir, ignore_errors=True)  # ~100 MB a run at 512-d; nothing reads it again
    bs = min(cfg.batch_size, metrics["train_pairs"])
    trained = metrics["steps"] * bs
    steps_s = wall - sum(tm.get(k, 0.0) for k in ("neighbours_s", "pairs_s", "eval_s", "checkpoint_s"))
    return {"variant": variant, "wall_s": wall, "pairs_trained": trained, "pairs_per_s": trained / wall,
            "steps": metrics["steps"], "steps_pairs_per_s": trained / steps_s, "store_queries": metrics["store_queries"],
            "neighbours_s": tm.get("neighbours_s", 0.0), "pairs_s": tm.get("pairs_s", 0.0),
            "steps_s": steps_s, "eval_s": tm.get("eval_s", 0.0), "checkpoint_s": tm.get("checkpoint_s", 0.0),
            "cpu_per_wall": cpu / wall, "final_train_loss": metrics["final"]["train_loss"],
            "final_val_loss": (metrics["final"].get("val") or {}).get("loss")}


# -- one embedding size ----------------------------------------------------------------------------------
def bench_dim(dim: int, args, work: Path) -> dict:
    label = f"{dim}d"
    spec = backbone_spec(dim, work)
    src = work / f"emb-{label}"
    t0 = time.perf_counter()
    n = write_embeddings(src, args.pairs, dim, args.data, args.seed)
    gen_s = time.perf_counter() - t0
    home = Path(args.home) if args.home else work / f"home-{label}"
    rt = fresh_runtime(home)
    try:
        rt.db  # the embedded profile migrates its metadata DB on first use: not timed
        log(f"[{label}] building a memory of {n} pairs ({args.data} {dim}-d embeddings, backbone {spec})")
        built = build_memory(rt, src, spec)
        shutil.rmtree(src, ignore_errors=True)
        log(f"[{label}] built in {built['build_s']:.1f}s")
        memory, memory_items, memory_build_s = MEMORY, built["items"], built["build_s"]
        if args.memory_size:  # neighbours from a separate, larger memory (reused when --home holds it)
            memory, memory_items, memory_build_s = neighbour_memory(rt, args, dim, spec, work)

        cfg = TrainConfig(epochs=1, seed=args.seed)
        create_job(rt, "setup", MEMORY, memory, cfg)
        with rt.db.session() as s:
            job = s.query(FusionModel).filter_by(name="setup").one().config["job"]
        t0 = time.perf_counter()
        pairs = load_pairs(rt, job["pairs"][2], job["pairs"][3])
        scan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        load_pairs(rt, job["pairs"][2], job["pairs"][3])
        pairs_cache_s = time.perf_counter() - t0
        cache = NeighbourCache(rt, job, cfg, dim)
        t0 = time.perf_counter()
        cache.get(pairs)  # the first fetch ever on this shard: cold engine and page cache, not in the comparison
        cold_fetch_s = time.perf_counter() - t0
        cold_queries = cache.store_queries
        nb_ram = {side: cache._load(side) for side in ("image", "text")}
        log(f"[{label}] pairs: store scan {scan_s:.1f}s, disk cache {pairs_cache_s:.2f}s; cold neighbour fetch "
            f"{cold_fetch_s:.1f}s ({cold_queries} batched queries)")

        for t in args.thread_list:
            torch.set_num_threads(t)
            run_variant(rt, "in_ram", f"warmup-ram-{t}", cfg, cache.dir, nb_ram, memory)  # kernels, allocator
        runs: dict[int, dict[str, list[dict]]] = {t: {v: [] for v in VARIANTS} for t in args.thread_list}
        for r in range(args.repeats):
            for t in args.thread_list:
                torch.set_num_threads(t)
                order = VARIANTS[r % 3:] + VARIANTS[:r % 3]  # rotating order: each variant in each position
                for variant in order:
                    res = run_variant(rt, variant, f"{variant}-{t}t-{r}", cfg, cache.dir, nb_ram, memory)
                    res["torch_threads"] = t
                    runs[t][variant].append(res)
                    log(f"[{label}] repeat {r + 1}/{args.repeats} {t} thread(s) {variant:7s} "
                        f"{res['pairs_per_s']:7.0f} pairs/s ({res['wall_s']:.2f}s: neighbours "
                        f"{res['neighbours_s']:.2f}s, steps {res['steps_s']:.2f}s, eval {res['eval_s']:.2f}s, "
                        f"checkpoint {res['checkpoint_s']:.2f}s)")
        items = built["items"]
    finally:
        torch.set_num_threads(args.thread_list[0])
        rt.close()
    if not args.home:
        shutil.rmtree(home, ignore_errors=True)
    common = {
        "embedding_dim": dim,
        "backbone": built["backbone"] if dim != 64 else "app.synthetic.TINY_CONFIG (a config .json)",
        "data": args.data,
        "pairs": items,
        "memory": {"name": memory, "items": memory_items, "build_s": memory_build_s},
        "train_config": {k: v for k, v in vars(cfg).items() if k != "device"},
        "setup": {"embeddings_write_s": gen_s, "memory_build_s": built["build_s"],
                  "pairs_store_scan_s": scan_s, "pairs_disk_cache_load_s": pairs_cache_s,
                  "cold_neighbour_fetch_s": cold_fetch_s, "cold_neighbour_batched_queries": cold_queries},
    }
    return {f"{label}_{t}thread{'s' if t > 1 else ''}": {**common, "torch_threads": t, **summarise(runs[t], items)}
            for t in args.thread_list}


def neighbour_memory(rt: Runtime, args, dim: int, spec: str, work: Path) -> tuple[str, int, float | None]:
    """The memory "mem" of --memory-size items the neighbours come from: reused when the home already holds a
    ready version of that size (benchmarks/inference.py --home builds the same), else built here."""
    from app.memory import list_memories

    for m in list_memories(rt):
        ready = [v for v in m["versions"] if m["name"] == "mem" and v["status"] == "ready"
                 and v["items_stored"] == args.memory_size]
        if ready:
            log(f"reusing memory mem v{ready[-1]['version']} ({args.memory_size} items) in {rt.settings.home}")
            return "mem", args.memory_size, None
    src = work / "emb-neighbours"
    n = write_embeddings(src, args.memory_size, dim, args.data, args.seed + 1)
    log(f"building the neighbour memory: {n} pairs")
    built = build_memory(rt, src, spec, "mem")
    shutil.rmtree(src, ignore_errors=True)
    log(f"neighbour memory built in {built['build_s']:.1f}s")
    return "mem", built["items"], built["build_s"]


def summarise(runs: dict[str, list[dict]], items: int) -> dict:
    def med(v: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[v])

    summary = {v: {"pairs_per_s_median": med(v, "pairs_per_s"),
                   "pairs_per_s_all": [x["pairs_per_s"] for x in runs[v]],
                   "wall_s_median": med(v, "wall_s"),
                   "split_s_median": {k: med(v, k) for k in ("neighbours_s", "steps_s", "eval_s", "checkpoint_s",
                                                             "pairs_s")},
                   "steps_only_pairs_per_s_median": med(v, "steps_pairs_per_s"),
                   "cpu_busy_per_wall_second_median": med(v, "cpu_per_wall"),
                   "store_queries": sorted({x["store_queries"] for x in runs[v]})}
               for v in VARIANTS}
    ram = summary["in_ram"]["pairs_per_s_median"]
    per_repeat = {f"{v}_vs_in_ram": [a["pairs_per_s"] / b["pairs_per_s"] for a, b in zip(runs[v], runs["in_ram"])]
                  for v in ("first", "cached")}
    fetch = med("first", "neighbours_s")
    queries = 2 * items  # one query per pair and side
    epoch_ram = med("in_ram", "wall_s")
    losses = [x["final_train_loss"] for v in VARIANTS for x in runs[v]]
    return {
        "train_pairs_per_epoch": runs["in_ram"][0]["pairs_trained"],
        "steps_per_epoch": runs["in_ram"][0]["steps"],
        "neighbour_fetch": {
            "kNN_queries": queries, "seconds_median": fetch, "queries_per_s": queries / fetch,
            "ms_per_pair": 1000 * fetch / items,
            "note": "first variant: batched store.search (256 queries a call, k+10 hits for the dedup filter, own "
                    "item excluded), both sides; then each distinct neighbour's vector taken from the pairs",
        },
        "variants": summary,
        "ratios": {"cached_vs_in_ram": summary["cached"]["pairs_per_s_median"] / ram,
                   "first_epoch_vs_in_ram": summary["first"]["pairs_per_s_median"] / ram,
                   "per_repeat": per_repeat,
                   "per_repeat_median": {k: statistics.median(v) for k, v in per_repeat.items()}},
        "derived": {
            f"first_run_of_{e}_epochs_vs_in_ram": e * epoch_ram / (fetch + e * epoch_ram) for e in (1, 3, 10)
        } | {"basis": "fetch once (median first-variant neighbour time) + E x the median in_ram epoch; "
                      "10 epochs is TrainConfig's default"},
        "same_training": {"final_train_loss_max_abs_diff": max(losses) - min(losses),
                          "identical": max(losses) - min(losses) < 1e-6},
        "runs": runs,
    }


# -- the data path alone: per-step permutation and host gather vs epoch order and resident data ----------------
def bench_data_path(n: int, dim: int, k: int, bs: int, steps: int, device: str, seed: int = 0) -> dict:
    """Seconds per step of making the batch, old and new, on random arrays of a neighbour cache's shape."""
    from app.train import Pairs, SideNeighbours, StepRows, place_data

    rng = np.random.default_rng(seed)
    u = min(n, 4 * n // 5 + 1)
    pairs = Pairs([], [], rng.standard_normal((n, dim), np.float32), rng.standard_normal((n, dim), np.float32))
    nbrs = {side: SideNeighbours(rng.integers(0, u, (n, k)).astype(np.int32), rng.random((n, k), np.float32),
                                 rng.random((n, k)) > 0.1, rng.standard_normal((u, dim), np.float32))
            for side in ("image", "text")}
    train_rows, per_epoch = np.arange(n), max(1, n // bs)

    def old(step):
        epoch, pos = divmod(step, per_epoch)
        rows = np.random.default_rng(seed * 1000 + epoch).permutation(train_rows)[pos * bs : (pos + 1) * bs]
        ni, nt = nbrs["image"], nbrs["text"]

        def t(x, dtype=torch.float32):
            return torch.as_tensor(x, dtype=dtype, device=device)

        return (t(pairs.image[rows]), t(pairs.text[rows]),
                (t(ni.table[ni.idx[rows]]), t(ni.scores[rows]), t(ni.mask[rows], torch.bool)),
                (t(nt.table[nt.idx[rows]]), t(nt.scores[rows]), t(nt.mask[rows], torch.bool)))

    t0 = time.perf_counter()
    data = place_data(pairs, nbrs, device)
    place_s = time.perf_counter() - t0
    rows_at = StepRows(train_rows, bs, per_epoch, seed, put=data.index)

    def new(step):
        return data.batch(rows_at(step))

    def flat(b):
        return [y for x in b for y in (x if isinstance(x, tuple) else (x,))]

    same = all(torch.equal(a, b) for a, b in zip(flat(old(1)), flat(new(1))))
    out = {"rows": n, "dim": dim, "k": k, "batch": bs, "steps": steps, "device": device,
           "resident": data.resident, "place_data_s": place_s, "identical_batches": same}
    for name, fn in (("old_per_step", old), ("new_resident", new)):
        fn(0)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for step in range(steps):
            fn(step)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / steps
        out[name] = {"s_per_step": sec, "pairs_per_s": bs / sec}
    out["new_vs_old"] = out["new_resident"]["pairs_per_s"] / out["old_per_step"]["pairs_per_s"]
    return out


def main_data_path(args) -> int:
    res = bench_data_path(args.path_rows, int(args.dims.split(",")[0]), 10, args.batch, args.path_steps,
                          args.path_device, args.seed)
    log(f"data path, {res['rows']} rows x {res['dim']}-d, batch {res['batch']}, {res['device']}: old "
        f"{res['old_per_step']['pairs_per_s']:.0f} pairs/s, new {res['new_resident']['pairs_per_s']:.0f} "
        f"(x{res['new_vs_old']:.1f}), identical batches {res['identical_batches']}")
    write_result(Path(args.out), {"benchmark": "training data path: per-step permutation + host gather vs epoch "
                                               "order + resident data (forward/backward excluded)",
                                  "command": "python benchmarks/train.py " + " ".join(sys.argv[1:]),
                                  "machine": machine(), "result": res})
    return 0


# -- main ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=20_000, help="pairs in the memory (= the training pairs)")
    p.add_argument("--dims", default="512,64", help="embedding sizes to run (64, 512, 768); the first is the headline")
    p.add_argument("--data", choices=("clustered", "random"), default="clustered")
    p.add_argument("--repeats", type=int, default=3, help="rotations of the three variants")
    p.add_argument("--threads", default=None,
                   help="torch intra-op thread counts to run, interleaved (default: 1, then torch's default); "
                        "the first is the headline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-size", type=int, default=0,
                   help="neighbours from a separate memory of this many items (default: the pairs are the memory)")
    p.add_argument("--home", default=None, help="RECO_HOME to use and keep (reuses a memory \"mem\" of "
                                                "--memory-size items, e.g. the one benchmarks/inference.py built)")
    p.add_argument("--out", default="benchmarks/results/train.json")
    p.add_argument("--workdir", default=None, help="parent of the temporary directory")
    p.add_argument("--data-path", action="store_true", help="only compare how a step's batch is made, old vs new")
    p.add_argument("--path-rows", type=int, default=1_000_000, help="--data-path: training rows")
    p.add_argument("--path-steps", type=int, default=20, help="--data-path: steps timed per variant")
    p.add_argument("--path-device", default="cpu", help="--data-path: cpu or cuda")
    p.add_argument("--batch", type=int, default=4096, help="--data-path: batch size")
    args = p.parse_args(argv)
    if args.data_path:
        if args.out == "benchmarks/results/train.json":
            args.out = "benchmarks/results/train-data-path.json"
        return main_data_path(args)
    dims = list(dict.fromkeys(int(x) for x in args.dims.split(",") if x.strip()))
    default_threads = torch.get_num_threads()
    args.thread_list = list(dict.fromkeys(int(x) for x in args.threads.split(",") if x.strip())) if args.threads \
        else list(dict.fromkeys([1, default_threads]))

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="reco-bench-train-", dir=args.workdir))
    results = {}
    try:
        for dim in dims:
            results.update(bench_dim(dim, args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    head_name = next(iter(results))
    head = results[head_name]
    ratios = {"cached_vs_in_ram": head["ratios"]["cached_vs_in_ram"],
              "first_epoch_vs_in_ram": head["ratios"]["first_epoch_vs_in_ram"],
              **{f"{k}_{name}": v for name, r in results.items() for k, v in r["ratios"].items()
                 if k in TARGETS},
              "basis": f"{head_name}: median pairs/s of the variant / median pairs/s in_ram, {args.repeats} rotating "
                       "repeats in one process; pairs/s = pairs trained in one epoch / wall time of run_training"}
    met = {k: ratios[k] >= t for k, t in TARGETS.items()}
    result = {
        "benchmark": "training: neighbours from the store (first epoch) / the disk cache (reruns) vs in RAM",
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine(("qdrant-edge-py",)), "torch_threads_default": default_threads, "torch_threads_run": args.thread_list},
        "method": {
            "memory": "precomputed embeddings (clip-retrieval layout) -> start_build + run_in_process "
                      "(embedded profile, qdrant-edge, sealed with HNSW, activated); pairs = memory",
            "runs": "each measured run = create_job + run_training(epochs=1) of a new model; variants differ only "
                    "in where NeighbourCache.get finds the neighbours (store / disk cache / RAM)",
            "timing": "wall time of run_training; neighbours_s = NeighbourCache.get, eval_s = evaluate, "
                      "checkpoint_s = checkpoint.save, pairs_s = load_pairs (disk cache), steps_s = the rest "
                      "(the training steps, plus model setup and DB updates)",
            "order": "variants rotate (first cached in_ram / cached in_ram first / in_ram first cached ...)",
        },
        "configs": results,
        "target": TARGETS,
        "ratios": ratios,
        "target_met": met,
    }
    out = Path(args.out)
    write_result(out, result)
    for name, r in results.items():
        s = r["variants"]
        log(f"{name}: in_ram {s['in_ram']['pairs_per_s_median']:.0f} pairs/s, cached "
            f"{s['cached']['pairs_per_s_median']:.0f} (x{r['ratios']['cached_vs_in_ram']:.2f}), first epoch "
            f"{s['first']['pairs_per_s_median']:.0f} (x{r['ratios']['first_epoch_vs_in_ram']:.2f}); kNN "
            f"{r['neighbour_fetch']['queries_per_s']:.0f} queries/s")
    log(f"targets {TARGETS}: {met} -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
