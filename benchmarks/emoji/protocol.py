"""The quality protocol, run through the product's own API: memory build, activate, train, eval.

Corpora (WebDataset shards written here, built into memories with `start_build`/`run_in_process`):
  pairs      google images of the non-target emoji the base was pretrained on, captions in varied forms
             (RECO's training pairs)
  unseen     google images of the other non-target emoji (`unseen_val`): neither the base nor the fusion
             trains on them, so that, like the targets, the base does not know them; RECO validates on them
  twitter    v1: twitter images of the non-target emoji; v2: all of them, targets included
             captions `{name} emoji` + emojilib keywords
  eval       facebook images of the targets, classified among all target names with CLIP-style prompts
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import data
from .base import BaseConfig, build_base

EVAL_TEMPLATES = ("a picture of the {c}.", "a photo of a {c}.", "an illustration of the {c}.",
                  "a rendering of a {c}.")


@dataclass
class Protocol:
    targets: list[str] = field(default_factory=lambda: ["country-flag"])
    seed: int = 0
    ks: tuple[int, ...] = (1, 3, 10, 30)
    headline_k: int = 10  # fixed before looking at any target (research note: chosen on non-target data)
    epochs: int = 20
    # ours: start as score-weighted retrieval fusion with τ = 0.01 (the research note's choice on non-target data)
    fusion_init: str = "retrieval"
    score_scale: float = 100.0
    batch_size: int = 256
    lr: float = 1e-3
    # share of the non-target emoji kept from the base's pretraining and from RECO's training pairs: RECO picks
    # its checkpoint on them, concepts the base does not know, as it does not know the targets. Validating on
    # concepts the base has seen picks the fusion that trusts the base, which fails on targets (README, quality)
    unseen_val: float = 0.15
    max_targets: int | None = None  # a reduced run (the test suite) keeps the first N target emoji
    max_rest: int | None = None  # ... and N non-target emoji
    ablations: bool = True  # False: only RECO vs the baseline and the no-target control (a quick check)
    base: BaseConfig = field(default_factory=BaseConfig)


def _train_cfg(p: Protocol, **over):
    from app.train import TrainConfig

    return TrainConfig(**{"k": max(p.ks), "epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr,
                          "seed": p.seed, "val_fraction": 0.15, "val_by": "concept", "checkpoint_every": 10_000,
                          "val_pairs": "unseen" if p.unseen_val else None,
                          # the earliest checkpoint within one standard error of the best on the unseen concepts:
                          # their accuracy plateaus within its noise while the targets' falls (README, quality)
                          "select": "1se" if p.unseen_val else "best",
                          "init": p.fusion_init, "score_scale": p.score_scale, **over})


def split_unseen(rest: list, share: float, seed: int) -> tuple[list, list]:
    """(seen, unseen): a seeded random `share` of the non-target emoji that the base and the fusion never see."""
    if not share:
        return list(rest), []
    order = np.random.default_rng(seed).permutation(len(rest))
    held = set(order[: max(2, round(share * len(rest)))].tolist())
    return [e for i, e in enumerate(rest) if i not in held], [e for i, e in enumerate(rest) if i in held]


def _top(run: dict, k: int | None) -> dict:
    m = run["baseline"] if k is None else run["reco"][str(k)]
    return {"top1": 100 * m["acc1"], "top5": 100 * m["acc5"]}


def run(p: Protocol, home: Path, cache: Path, log=print) -> dict:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(label):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timings[label] = round(timings.get(label, 0.0) + time.perf_counter() - self.t, 2)
        return _T()

    with timed("data"):
        emojis = data.catalogue(cache)
        targets, rest = data.split_targets(emojis, p.targets)
        if p.max_targets:
            targets = targets[: p.max_targets]
        if p.max_rest:
            rest = rest[:: max(1, len(rest) // p.max_rest)][: p.max_rest]
        seen, unseen = split_unseen(rest, p.unseen_val, p.seed)
        log(f"{len(targets)} target emoji ({', '.join(p.targets)}), {len(rest)} others"
            + (f" ({len(unseen)} of them unseen: RECO validates on them)" if unseen else ""))
    with timed("base_model"):
        backbone, base_info = build_base(home, p.base, seen, p.seed, log)

    work = home / "runs" / f"{'+'.join(p.targets)}-s{p.seed}-t{len(targets)}"
    shutil.rmtree(work, ignore_errors=True)
    corpora = work / "corpora"
    with timed("corpora"):
        pairs_src, unseen_src = (data.write_wds(corpora / name, [(e.key, data.rgb_png(e.images["google"]),
                                                                  data.pair_caption(e, p.seed)) for e in group])
                                 for name, group in (("pairs", seen), ("unseen", unseen)))
        mem_rows = {e.key: (e.key, data.rgb_png(e.images["twitter"]), data.memory_caption(e)) for e in emojis
                    if e in rest or e in targets}
        v1_src = data.write_wds(corpora / "twitter-v1", [mem_rows[e.key] for e in rest])
        v2_src = data.write_wds(corpora / "twitter-v2", [mem_rows[e.key] for e in rest + targets])
        eval_dir, classnames = data.write_eval_folder(corpora / "eval", targets)
        templates = corpora / "eval" / "templates.txt"
        templates.write_text("".join(t + "\n" for t in EVAL_TEMPLATES))

    os.environ["RECO_HOME"] = str(work / "home")
    for var in ("RECO_DATABASE_URL", "RECO_QDRANT_URL", "RECO_BROKER_URL"):
        os.environ.pop(var, None)
    from app.build import build_in_process
    from app.evaluate import evaluate_classification
    from app.memory import activate
    from app.runtime import Runtime
    from app.train import create_job, run_training

    rt = Runtime()
    with timed("memory_build"):
        build_in_process(rt, "pairs", str(pairs_src), backbone=backbone, activate=True)
        if unseen:
            build_in_process(rt, "unseen", str(unseen_src), backbone=backbone, activate=True)
        build_in_process(rt, "twitter", str(v1_src), backbone=backbone, activate=True)  # v1: no targets
        build_in_process(rt, "twitter", str(v2_src), backbone=backbone, activate=True)  # v2: with targets

    trained: dict[str, dict] = {}

    def train(name, memory, **over):
        with timed("train"):
            create_job(rt, name, "pairs", memory, _train_cfg(p, **over))
            trained[name] = run_training(rt, name, progress=False)
            log(f"trained {name}: best val acc {trained[name]['best']['score']:.3f} at step "
                f"{trained[name]['best']['step']} ({trained[name]['seconds']:.0f} s)")

    models = {"reco": ("twitter@2", {})}
    if p.ablations:
        models.update({
            "reco-plain": ("twitter@2", {"use_rank": False, "use_score": False, "init": "identity"}),  # the paper's
            "reco-identity": ("twitter@2", {"init": "identity"}),  # ours, started from the identity
            "reco-cross-search": ("twitter@2", {"search": "cross"}),
            "reco-uni-fusion": ("twitter@2", {"fusion": "uni"}),
            "reco-v1": ("twitter@1", {}),  # for the swap: trained with the memory that lacks the targets
        })
    for name, (memory, over) in models.items():
        train(name, memory, **over)

    evals: dict[str, dict] = {}

    def ev(label, model, memory=None, ks=(p.headline_k,), retrieval="both"):
        with timed("eval"):
            r = evaluate_classification(rt, model, f"imagefolder:{eval_dir}", memory=memory, ks=list(ks),
                                        retrieval=retrieval, guard=True, seed=p.seed,
                                        classnames=str(classnames), templates=str(templates))
        evals[label] = r
        return r if len(ks) > 1 else _top(r, ks[0])

    hk = p.headline_k
    main = ev("reco", "reco", "twitter@2", ks=p.ks)
    baseline = _top(main, None)
    table = {"frozen baseline": baseline, **{f"RECO k={k}": _top(main, k) for k in p.ks}}
    if p.ablations:
        table["RECO, image side only"] = ev("image_side", "reco", "twitter@2", retrieval="image")
        table["RECO, text side only"] = ev("text_side", "reco", "twitter@2", retrieval="text")
        table["cross-modal search"] = ev("cross_search", "reco-cross-search", "twitter@2")
        table["uni-modal fusion"] = ev("uni_fusion", "reco-uni-fusion", "twitter@2")
        table["paper's plain fusion (no rank, no score)"] = ev("plain", "reco-plain", "twitter@2")
        table["ours started from the identity (--init identity)"] = ev("identity_start", "reco-identity",
                                                                       "twitter@2")
    table["memory without the targets"] = ev("no_target_memory", "reco", "twitter@1")
    if p.ablations:
        table["swap: trained with v1, memory v1"] = ev("swap_before", "reco-v1", "twitter@1")
        activate(rt, "twitter", 2)
        # no memory named: the model follows the active version, now v2, with no retraining
        table["swap: trained with v1, memory v2 (no retraining)"] = ev("swap_after", "reco-v1", None)

    with timed("ceilings"):
        ceilings = _ceilings(rt, backbone, targets, eval_dir, classnames)

    reco_top1 = table[f"RECO k={hk}"]["top1"]
    gain = reco_top1 - baseline["top1"]
    row = lambda name: table[name]["top1"] if name in table else None  # noqa: E731
    swap = row("swap: trained with v1, memory v2 (no retraining)")
    headline = {
        "baseline_top1": baseline["top1"], "reco_top1": reco_top1,
        "uni_search_top1": reco_top1, "cross_search_top1": row("cross-modal search"),
        "no_target_memory_top1": row("memory without the targets"),
        "swap_recovery": None if swap is None else (swap - baseline["top1"]) / gain if gain > 0 else 0.0,
        "plain_fusion_top1": row("paper's plain fusion (no rank, no score)"),
        "image_to_image_hit_rate": ceilings["image_to_image"], "text_to_text_hit_rate": ceilings["text_to_text"],
        "k": hk, "classes": len(targets),
    }
    return {
        "protocol": {**asdict(p), "base": asdict(p.base)}, "targets": [e.name for e in targets],
        "n_train_pairs": len(seen), "n_unseen_val_pairs": len(unseen), "n_memory_v1": len(rest),
        "n_memory_v2": len(rest) + len(targets),
        "base_model": base_info, "backbone": backbone, "headline": headline, "table": table,
        "ceilings": ceilings, "training": trained,
        "eval_runs": {k: {key: v.get(key) for key in ("run", "model", "memory", "retrieval", "baseline", "reco",
                                                      "leakage_guard")} for k, v in evals.items()},
        "timings_s": {**timings, "total": round(time.perf_counter() - t_start, 1)},
    }


def _ceilings(rt, backbone: str, targets, eval_dir: Path, classnames: Path) -> dict:
    """What uni-modal search can give at best (k = 1): a facebook image's nearest memory image is its own emoji;
    a class prompt's nearest memory caption is its own class."""
    from app.backbone import get_backbone
    from app.memory import resolve_collection

    bb = get_backbone(backbone, "cpu", "1")
    collection, _ = resolve_collection(rt, "twitter", 2)
    keys = [e.key for e in targets]
    from PIL import Image

    imgs = [Image.open(next((eval_dir / f"{i:04d}").iterdir())).convert("RGB") for i in range(len(targets))]
    v = bb.encode_images(imgs)
    hits = rt.store.search(collection, v, using="image", k=1, with_payload=True)
    i2i = float(np.mean([bool(h) and h[0].payload.get("key") == key for h, key in zip(hits, keys)]))
    t = bb.encode_texts([EVAL_TEMPLATES[0].format(c=e.name) for e in targets])
    hits = rt.store.search(collection, t, using="text", k=1, with_payload=True)
    t2t = float(np.mean([bool(h) and h[0].payload.get("key") == key for h, key in zip(hits, keys)]))
    return {"image_to_image": 100 * i2i, "text_to_text": 100 * t2t, "k": 1}
