"""Can validation see a better balance than the untrained start? A diagnostic on non-target data only.

    python -m benchmarks.emoji balance --regime rare --seeds 0,1,2

For each seed: the protocol's concept split and base (cached), its validation pairs (facebook drawings of the
held-out subcategories, each told apart among its own captions, as `reco train --val-batching shard` scores them)
and its memory; then the gated layers at step 0 with each side's gate bias set by hand, over a grid. A bias b makes
the memory term weigh e^b times the query (g = σ(b); 0 is the untrained start), i.e. every global balance a
trained gate could reach. Pooled over seeds, each cell's validation accuracy minus the start's, with a paired
bootstrap interval (images resampled within each seed). If no cell clears the start by more than validation's
noise, no training that only re-balances query and memory can be picked on validation, whatever it learns.
`switch_oracle` reads the same grid per drawing: the image balance that gets each drawing right, chosen with
hindsight, bounds what a per-query image gate could gain on these drawings.
The grid reads no target (their drawings sit in the memory, as in every run); `--targets` then measures the one
cell validation picked on the target groups, once, beside the untrained start, through the product's evaluation.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from .args import listed, shared
from .protocol import (Protocol, _train_cfg, concepts, fresh_runtime, held_out_home, held_out_shards,
                       val_subcategories)
from .report import BOOTSTRAP, paired_gains

BIASES = (-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def validation_hits(p: Protocol, home: Path, cache: Path, log=print) -> dict:
    """{(b_img, b_txt): bool per validation pair} for one seed; the cell (0, 0) is the untrained start. Leaves
    the seed's RECO_HOME (memories `unseen` and `twitter`, the registered model `balance`) for `target_hits`."""
    import torch

    from app.db.models import FusionModel
    from app.fusion import build
    from app.train import NeighbourCache, create_job, evaluate, fusion_config, load_pairs

    _, rt = held_out_home(p, home, cache, "balance", lambda unseen: {
        "unseen": held_out_shards(val_subcategories(unseen), (p.val_vendor,))}, log)
    cfg = _train_cfg(p, val_pairs=None)
    create_job(rt, "balance", "unseen", "twitter", cfg)  # its job names the data (`target_hits` runs it)
    with rt.db.session() as s:
        m = s.query(FusionModel).filter_by(name="balance").one()
        job, dim = m.config["job"], m.dim
    pairs = load_pairs(rt, job["pairs"][2], job["pairs"][3])
    nbrs = NeighbourCache(rt, job, cfg, dim, "cpu").get(pairs)
    model = build(fusion_config(cfg, dim), cfg.seed)  # the protocol's gated layers at step 0
    rows = np.arange(len(pairs.ids))
    out = {}
    for bi, bt in itertools.product(BIASES, repeat=2):
        with torch.no_grad():
            model.image.gate.bias.fill_(bi)
            model.text.gate.bias.fill_(bt)
        out[(bi, bt)] = evaluate(model, pairs, nbrs, rows, cfg.batch_size, torch.device("cpu"), "shard",
                                 hits=True)["hits"]
    log(f"{p.regime} seed {p.seed}: {len(rows)} validation pairs, start {100 * out[(0.0, 0.0)].mean():.1f} %")
    return out


def target_hits(p: Protocol, home: Path, cache: Path, cell: tuple[float, float]) -> dict:
    """After `validation_hits` for the same seed: the target groups classified (facebook drawings among each
    group's own names, the runs' evaluation) by the untrained start and by the same layers with the gate biases
    set to `cell`, through the product's evaluation. The cell must have been chosen on validation alone."""
    import torch

    from app import checkpoint
    from app.db.models import FusionModel
    from app.train import run_training

    from .protocol import DEV, EVAL_TEMPLATES, _classify, _write_group

    c = concepts(p, cache)
    work = home / "runs" / f"balance-{p.regime}-s{p.seed}"
    rt = fresh_runtime(work / "home")
    # the registered job run for one epoch at lr 0: its files are the start; `best` then gets the cell's biases
    with rt.db.session() as s:
        m = s.query(FusionModel).filter_by(name="balance").one()
        m.config = {**m.config, "job": {**m.config["job"], "train": {**m.config["job"]["train"], "lr": 0.0,
                                                                      "epochs": 1}}}
        ckdir = Path(m.checkpoint_dir)
    run_training(rt, "balance", progress=False)
    tensors, meta = checkpoint.load(ckdir, "best")
    for side, bias in zip(("image", "text"), cell):
        tensors[f"{side}.gate.weight"] = torch.zeros_like(tensors[f"{side}.gate.weight"])
        tensors[f"{side}.gate.bias"] = torch.full_like(tensors[f"{side}.gate.bias"], bias)
    checkpoint.save(ckdir, "best", tensors, meta)
    templates = work / "templates.txt"
    templates.write_text("".join(t + "\n" for t in EVAL_TEMPLATES))
    out = {}
    for i, (g, members) in enumerate((g, ms) for g, ms in c["groups"].items() if g != DEV):
        es = _write_group(work / "eval" / f"g{i}", members, p.seed)
        cell_run = _classify(rt, p, "balance", "twitter", es, templates, full=True)
        start_run = _classify(rt, p, "balance", "twitter", es, templates, checkpoint="start", full=True)
        k = str(p.headline_k)
        out[g] = {"top1_hits": {"baseline": cell_run["top1_hits"]["baseline"], "reco": cell_run["top1_hits"]["reco"][k],
                                "untrained": start_run["top1_hits"]["reco"][k]},
                  "headline": {"classes": len(members)}}
    return out


def pooled_grid(per_seed: list[dict]) -> list[dict]:
    """Per cell: pooled accuracy, minus the start, and its paired bootstrap 95 % interval (`paired_gains`)."""
    return [{"image_bias": cell[0], "text_bias": cell[1], "memory_weight_image": float(np.exp(cell[0])),
             "memory_weight_text": float(np.exp(cell[1])), **gain}
            for cell, gain in paired_gains(per_seed, (0.0, 0.0)).items()]


def switch_oracle(per_seed: list[dict]) -> dict:
    """The headroom of a per-query image gate, with hindsight: per drawing, the image side's balance that gets it
    right, if any, the text side at its start. "off_or_start": the memory off (image bias BIASES[0]) or the start;
    "any": any image bias of the grid. Upper bounds (chosen per drawing on its own answer, so luck adds to them),
    pooled with `paired_gains` against the start; what a trained gate gains out of fold is read against them."""
    cols = [(b, 0.0) for b in BIASES]
    switched = [{"start": h[(0.0, 0.0)], "off_or_start": h[(0.0, 0.0)] | h[cols[0]],
                 "any": np.logical_or.reduce([h[c] for c in cols])} for h in per_seed]
    gains = paired_gains(switched, "start")
    return {k: gains[k] for k in ("off_or_start", "any")}


def markdown(r: dict) -> str:
    cells = {(c["image_bias"], c["text_bias"]): c for c in r["cells"]}
    head = "| image bias \\ text bias | " + " | ".join(f"{b:+g}" for b in BIASES) + " |"
    lines = [f"### {r['regime']} regime: validation top-1 minus the untrained start, by global gate bias "
             f"(pooled over seeds {', '.join(map(str, r['seeds']))}, {r['images']} validation drawings)", "",
             head, "|" + "---|" * (len(BIASES) + 1)]
    for bi in BIASES:
        lines.append(f"| {bi:+g} | " + " | ".join(f"{cells[(bi, bt)]['minus_start']:+.1f}" for bt in BIASES) + " |")
    best = r["best"]
    lines += ["", f"Start: {r['start_top1']:.1f} %. Best cell: image bias {best['image_bias']:+g}, text bias "
              f"{best['text_bias']:+g}: {best['minus_start']:+.1f} [{best['ci95_low']:+.1f}, {best['ci95_high']:+.1f}] "
              f"(picked on the same drawings, so its gain is an upper bound). One standard error of the start's "
              f"accuracy: {r['start_se']:.1f} points.", ""]
    o = r.get("oracle")
    if o:
        lines += [f"A per-query image gate with hindsight (per drawing, the text side at its start): the memory off "
                  f"or the start {o['off_or_start']['minus_start']:+.1f}, any image bias of the grid "
                  f"{o['any']['minus_start']:+.1f}. Upper bounds of what a per-query image gate could gain here.", ""]
    t = r.get("targets")
    if t:
        lines += [f"That cell on the target groups, pooled over the {t['images']} drawings and the seeds (95 % paired "
                  f"bootstrap): untrained start {t['untrained_top1']:.1f} → {t['reco_top1']:.1f}, "
                  f"{t['reco_minus_untrained']:+.1f} [{t['ci95_low']:+.1f}, {t['ci95_high']:+.1f}] (baseline "
                  f"{t['baseline_top1']:.1f}). Per group (mean over seeds), start → cell: "
                  + ", ".join(f"{g} {v['untrained']:.1f} → {v['reco']:.1f}" for g, v in t["per_group"].items()) + ".",
                  ""]
    return "\n".join(lines)


def main(argv) -> int:
    from benchmarks.common import log, write_result

    ap = argparse.ArgumentParser(prog="python -m benchmarks.emoji balance", description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=("absent", "rare"), default="rare")
    ap.add_argument("--max-targets", type=int, default=None, help="keep the first N target emoji (reduced run)")
    ap.add_argument("--targets", action="store_true",
                    help="then measure validation's best cell once on the target groups (RECO = that cell)")
    shared(ap)
    args = ap.parse_args(argv)
    seeds = listed(ap, "--seeds", args.seeds)
    protocols = [Protocol(regime=args.regime, seed=s, max_rest=args.max_others, max_targets=args.max_targets)
                 for s in seeds]
    home, cache = Path(args.home).resolve(), Path(args.cache)
    per_seed = [validation_hits(p, home, cache, log) for p in protocols]
    cells = pooled_grid(per_seed)
    start = next(c for c in cells if c["image_bias"] == 0 and c["text_bias"] == 0)
    best = max(cells, key=lambda c: c["minus_start"])
    targets = None
    if args.targets:  # validation's best cell, measured once on the targets (chosen before they are read)
        from .report import pooled

        cell = (best["image_bias"], best["text_bias"])
        runs = [{"groups": target_hits(p, home, cache, cell), "protocol": {"seed": p.seed}} for p in protocols]
        targets = {"cell": list(cell), **pooled(runs),
                   "per_group": {g: {m: 100 * float(np.mean([c == "1" for r in runs
                                                              for c in r["groups"][g]["top1_hits"][m]]))
                                     for m in ("baseline", "untrained", "reco")} for g in runs[0]["groups"]}}
    n = sum(len(h[(0.0, 0.0)]) for h in per_seed)
    acc = start["top1"] / 100
    result = {"benchmark": "emoji balance: validation accuracy of every global query/memory balance",
              "command": "python -m benchmarks.emoji balance " + " ".join(argv), "regime": args.regime,
              "seeds": seeds, "images": n, "start_top1": start["top1"],
              "start_se": 100 * float(np.sqrt(acc * (1 - acc) / n)), "bootstrap": BOOTSTRAP,
              "best": best, "cells": cells, "oracle": switch_oracle(per_seed), "targets": targets}
    reduced = args.max_others or args.max_targets
    out = Path(args.out_dir) / f"emoji-balance-{args.regime}{'-reduced' if reduced else ''}.json"
    write_result(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    log(markdown(result))
    log(f"-> {out} (+ .md)")
    return 0
