"""Class sets at scale: zero-shot classification throughput and RAM of a stored class set ranked by a top-k
search of the store, against the dense matrix (in RAM as an in-run classifier holds it, and loaded from the
store as `--ranking dense` reads it), for 1k to 1M synthetic 512-d classes, one run.

    python benchmarks/classes.py [--sizes 1000,3000,10000,30000,100000,1000000] [--images 2000]
                                 [--out benchmarks/results/classes.json]

Classes: the clustered CLIP-like generator of benchmarks/search.py (unit vectors), stored through the product
(`app.classes.store_class_set`, the path `reco classes build` takes after encoding; backbone spec ViT-B-32, no
text is encoded) with the default storage (`auto`: int8 with rescoring once the set gets a graph), and at the
largest size also with the originals on disk. Images: held-out draws from the same generator. Ranking runs
exactly as `reco eval classification --classes` runs it (`ClassIndex.top_k`, top 5, every image in one call).
Truth is the exact top 5 of the dense matrix; the search's top-1 agreement and recall@5 are reported beside
its speed, at the class sets' default ef (512) and at the store's (128), for images from the classes'
distribution and for random directions (queries off the data's distribution, as another modality's are).

Each measurement runs in a process of its own, so its peak RSS (ru_maxrss) is its own: `data`, `build`,
`dense_ram` (the matrix from a .npy file: what an in-run dense classifier holds), `dense_store` (the matrix read
from the store, then ranked) and `search`.

End to end (`--e2e N`, default 1M; `--e2e-only` adds it to an existing result): the whole
`reco eval classification --dataset oven:... --classes big` path on this machine, with the tiny open_clip model
of the tests (64-d): a model trained on synthetic shapes, the OVEN stand-in (64 images, 32 entities, seen and
unseen) and a class set holding its 32 entities (encoded) among N synthetic distractors (the clustered
generator at 64-d); wall time, images/s and peak RSS of the evaluation, by search and by the dense
matrix, and how often the two rankings' top-1 agree (the tiny model's weights are random: its accuracy means
nothing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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

from benchmarks.memory_scale import peak_rss_gb, stage  # noqa: E402

DIM, SPEC, TOP, NAME = 512, "ViT-B-32", 5, "classes"
BATCH = 10_000  # classes per store write


def stage_data(n: int, images: int, src: str, seed: int) -> dict:
    from benchmarks.search import clustered

    gen = dict(clusters=min(1000, max(1, n // 100)), centre_rank=128, cluster_rank=48, mean_weight=0.5,
               spread=0.6, iso_noise=0.15)
    x = clustered(n + images, DIM, seed=seed, **gen)
    Path(src).mkdir(parents=True, exist_ok=True)
    np.save(Path(src) / "classes.npy", x[:n].astype(np.float32))
    np.save(Path(src) / "images.npy", x[n:].astype(np.float32))
    off = np.random.default_rng(seed + 1).standard_normal((images, DIM)).astype(np.float32)
    np.save(Path(src) / "images_off.npy", off / np.linalg.norm(off, axis=1, keepdims=True))
    return {"peak_rss_gb": peak_rss_gb()}


def stage_build(home: str, src: str, on_disk: bool) -> dict:
    from app.backbone import BackboneSpec
    from app.classes import store_class_set
    from app.store.base import Storage
    from benchmarks.train import fresh_runtime

    rt = fresh_runtime(Path(home))
    x = np.load(Path(src) / "classes.npy", mmap_mode="r")
    spec = BackboneSpec.parse(SPEC)

    def batches():
        for a in range(0, len(x), BATCH):
            ids = [f"Q{i}" for i in range(a, min(a + BATCH, len(x)))]
            yield ids, [f"entity {i}" for i in range(a, a + len(ids))], {"frozen": np.array(x[a:a + len(ids)])}

    t0 = time.perf_counter()
    v = store_class_set(rt, NAME, batches(), count=len(x), source="synthetic", backbone=spec.canonical,
                        backbone_hash=spec.fingerprint, dim=DIM, activate=True, storage=Storage("auto", on_disk))
    build_s = time.perf_counter() - t0
    applied = rt.store.storage(v.collection)
    disk = sum(f.stat().st_size for f in (rt.settings.vectors_dir / v.collection).rglob("*") if f.is_file())
    rt.close()
    return {"build_s": build_s, "applied": applied, "disk_gb": disk / 1024 ** 3, "peak_rss_gb": peak_rss_gb()}


def stage_dense_ram(src: str) -> dict:
    import torch  # noqa: F401  (imported before the clock starts, as in a running evaluation)

    from app.classes import dense_top_k

    x = np.load(Path(src) / "classes.npy")
    q = np.load(Path(src) / "images.npy")
    t0 = time.perf_counter()
    top, _ = dense_top_k(q, x, TOP)
    rank_s = time.perf_counter() - t0
    np.save(Path(src) / "truth.npy", top)
    np.save(Path(src) / "truth_off.npy", dense_top_k(np.load(Path(src) / "images_off.npy"), x, TOP)[0])
    return {"images_per_s": len(q) / rank_s, "rank_s": rank_s, "peak_rss_gb": peak_rss_gb()}


def _ranked(home: str, src: str, ranking: str, ef: int | None = None, images: str = "images"
            ) -> tuple[dict, np.ndarray]:
    import torch  # noqa: F401  (imported before the clock starts, as in a running evaluation)

    from app.classes import ClassIndex
    from benchmarks.train import fresh_runtime

    rt = fresh_runtime(Path(home))
    q = np.load(Path(src) / f"{images}.npy")
    index = ClassIndex.open(rt, NAME)
    index.ef = ef or index.ef
    with rt.store.hold(index.collection):
        t0 = time.perf_counter()
        top, _ = index.top_k(q, "frozen", TOP, ranking)  # dense: the first call reads the matrix
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index.top_k(q, "frozen", TOP, ranking)
        again_s = time.perf_counter() - t0
    rt.close()
    ids = np.vectorize(lambda c: int(c[1:]))(top)
    return {"first_call_s": first_s, "images_per_s": len(q) / first_s, "images_per_s_warm": len(q) / again_s,
            "peak_rss_gb": peak_rss_gb()}, ids


def stage_dense_store(home: str, src: str) -> dict:
    out, _ = _ranked(home, src, "dense")
    return out


def stage_search(home: str, src: str) -> dict:
    """At the class sets' default ef and at the store's (128), for images from the classes' distribution and
    for images off it (random directions: the worst case of a query from another modality)."""
    from app.classes import CLASS_SEARCH_EF

    out = {"ef": CLASS_SEARCH_EF}
    for ef in (CLASS_SEARCH_EF, 128):
        for images in ("images", "images_off"):
            res, top = _ranked(home, src, "search", ef=ef, images=images)
            truth = np.load(Path(src) / f"truth{images[6:]}.npy")
            res["top1_agreement"] = float((top[:, 0] == truth[:, 0]).mean())
            res["recall_at_5"] = float(np.mean([len(set(a) & set(b)) / TOP
                                                for a, b in zip(top.tolist(), truth.tolist())]))
            if ef == CLASS_SEARCH_EF and images == "images":
                out.update(res)
            else:
                out[f"ef{ef}{images[6:]}"] = res
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def stage_e2e_setup(home: str, work: str, n: int) -> dict:
    from app import synthetic
    from app.backbone import BackboneSpec, get_backbone
    from app.build import build_in_process
    from app.classes import store_class_set
    from app.datasets import templates_for
    from app.metrics import zero_shot_weights
    from app.train import TrainConfig, create_job, run_training
    from benchmarks.search import clustered
    from benchmarks.train import fresh_runtime

    rt, work = fresh_runtime(Path(home)), Path(work)
    config = str(synthetic.write_tiny_config(work / "tiny.json"))
    synthetic.write_wds(work / "mem", 4, 64, seed=1, jitter=0.3)
    build_in_process(rt, "mem", work / "mem", backbone=config, activate=True)
    create_job(rt, "m", "mem", "mem", TrainConfig(k=10, epochs=30, batch_size=64, lr=3e-3, dedup_threshold=None,
                                                  val_by="item", checkpoint_every=1000))
    run_training(rt, "m", progress=False)
    oven = synthetic.write_oven(work / "oven", entities=32, per_entity=2)
    entities = [json.loads(line) for line in (oven / "Wiki6M_ver_1_0_title_only.jsonl").read_text().splitlines()]
    spec, bb = BackboneSpec.parse(config), get_backbone(config)
    templates = templates_for("oven")
    real = zero_shot_weights(bb.encode_texts([t.format(c=e["wikipedia_title"]) for e in entities for t in templates]),
                             len(entities), len(templates))

    def batches():
        yield [e["wikidata_id"] for e in entities], [e["wikipedia_title"] for e in entities], {"frozen": real}
        for a in range(0, n, BATCH):  # CLIP-like clusters, as the 512-d sizes use
            m = min(BATCH, n - a)
            x = clustered(m, spec.dim, seed=a, clusters=max(1, m // 100), centre_rank=32, cluster_rank=16,
                          mean_weight=0.5, spread=0.6, iso_noise=0.15)
            yield [f"D{i}" for i in range(a, a + m)], [f"distractor {i}" for i in range(a, a + m)], {"frozen": x}

    t0 = time.perf_counter()
    store_class_set(rt, "big", batches(), count=n + len(entities), source="synthetic", backbone=spec.canonical,
                    backbone_hash=spec.fingerprint, dim=spec.dim, details={"templates": templates}, activate=True)
    build_s = time.perf_counter() - t0
    rt.close()
    return {"classes": n + len(entities), "dim": spec.dim, "build_s": build_s, "peak_rss_gb": peak_rss_gb()}


def stage_e2e_eval(home: str, work: str, ranking: str) -> dict:
    from app.evaluate import evaluate_classification
    from benchmarks.train import fresh_runtime

    rt = fresh_runtime(Path(home))
    t0 = time.perf_counter()
    run = evaluate_classification(rt, "m", f"oven:{Path(work) / 'oven'}", classes="big", ranking=ranking,
                                  retrieval="image")
    wall = time.perf_counter() - t0
    rt.close()
    return {"ranking": ranking, "wall_s": wall, "images": run["n_images"], "images_per_s": run["n_images"] / wall,
            "rank_s_per_image": run["timing_per_item_s"]["rank"], "peak_rss_gb": peak_rss_gb(),
            "predictions": [[d["baseline"], d["reco"]] for d in run["details"]]}


STAGES = {"e2e_setup": stage_e2e_setup, "e2e_eval": stage_e2e_eval, "data": stage_data, "build": stage_build, "dense_ram": stage_dense_ram, "dense_store": stage_dense_store,
          "search": stage_search}


def run_size(n: int, images: int, work: Path, on_disk_too: bool, seed: int) -> dict:
    src, out = work / f"data-{n}", {"classes": n, "images": images}
    out["data"] = stage("data", __file__, n=n, images=images, src=str(src), seed=seed)
    out["dense_ram"] = stage("dense_ram", __file__, src=str(src))
    for option in (["in-ram", "on-disk"] if on_disk_too else ["in-ram"]):
        home = work / f"home-{n}-{option}"
        row = out.setdefault("store", {})[option] = {}
        row["build"] = stage("build", __file__, home=str(home), src=str(src), on_disk=option == "on-disk")
        if option == "in-ram":
            row["dense_store"] = stage("dense_store", __file__, home=str(home), src=str(src))
        row["search"] = stage("search", __file__, home=str(home), src=str(src))
        shutil.rmtree(home, ignore_errors=True)
        print(json.dumps({"classes": n, option: row}), flush=True)
    shutil.rmtree(src, ignore_errors=True)
    return out


def crossover(rows: list[dict]) -> int | None:
    """The smallest measured class count at which the search outruns the dense matrix read from the store."""
    for r in sorted(rows, key=lambda r: r["classes"]):
        s = r["store"]["in-ram"]
        if s["search"]["images_per_s"] > s["dense_store"]["images_per_s"]:
            return r["classes"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,3000,10000,30000,100000,1000000")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default="benchmarks/results/classes.json")
    ap.add_argument("--e2e", type=int, default=1_000_000, help="distractor classes of the end-to-end run (0: none)")
    ap.add_argument("--e2e-only", action="store_true", help="run only the end-to-end part, into an existing --out")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        print(json.dumps(STAGES[a.stage](**json.loads(a.args))))
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="reco-classes-"))
    if a.e2e_only:
        result = json.loads(Path(a.out).read_text())
    else:
        sizes = [int(s) for s in a.sizes.split(",")]
        rows = [run_size(n, a.images, work, on_disk_too=n == max(sizes), seed=a.seed) for n in sizes]
        result = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dim": DIM, "top": TOP,
                  "cpus": os.cpu_count(), "sizes": rows, "search_beats_dense_from": crossover(rows)}
    if a.e2e:
        e2e, home = work / "e2e", work / "e2e-home"
        result["end_to_end"] = {"setup": stage("e2e_setup", __file__, home=str(home), work=str(e2e), n=a.e2e)}
        for ranking in ("search", "dense"):
            result["end_to_end"][ranking] = stage("e2e_eval", __file__, home=str(home), work=str(e2e),
                                                  ranking=ranking)
        # the tiny model has random weights: its accuracy means nothing; the two rankings must agree
        got = [result["end_to_end"][r].pop("predictions") for r in ("search", "dense")]
        result["end_to_end"]["top1_agreement_search_vs_dense"] = float(np.mean(
            [a == b for x, y in zip(*got) for a, b in zip(x, y)]))
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(e2e, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}; search outruns the dense matrix from {result['search_beats_dense_from']} classes")


if __name__ == "__main__":
    main()
