"""RECO's quality effect on real artwork: held-out fine-grained emoji, a frozen base, a swappable memory.

    python -m benchmarks.emoji [--regime absent|rare] [--seeds 0,1,2] [--targets country-flag,animal-mammal,...]
    python -m benchmarks.emoji summary          # emoji-summary.{json,md} from the runs in benchmarks/results
    python -m benchmarks.emoji balance          # can validation see a better query/memory balance than the start?
    python -m benchmarks.emoji crossfit         # which gate recipe, trained on held-out subcategories, carries over?

Installs the emoji npm packages into a cache when missing (RECO_BENCH_CACHE, default ~/.cache/reco/bench),
pretrains or reuses the base model (cached under --home by a hash of config, data and seed), then builds the
memories, trains RECO and evaluates every target group through the product's API. Writes per seed the JSON, a
markdown table beside it (.md) and a plot (.png); after the default targets it refreshes the summary over seeds.
See benchmarks/emoji/protocol.py for the protocol.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the text tower is a local folder: nothing to download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RECO_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import log, write_result  # noqa: E402
from benchmarks.emoji import data  # noqa: E402
from benchmarks.emoji.args import RESULTS, listed, shared, split  # noqa: E402
from benchmarks.emoji.base import BaseConfig  # noqa: E402
from app.gate import GATE_SETS  # noqa: E402
from app.train import BATCHING, LOSSES, TUNE  # noqa: E402
from benchmarks.emoji.protocol import (DEFAULT_TARGETS, REGIMES, TRAIN_ON, Protocol, base_model,  # noqa: E402
                                       concepts, run)
from benchmarks.emoji.report import markdown, plot, replications, summarize  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["summary"]:
        return _summary(argv[1:])
    if argv[:1] == ["balance"]:
        from benchmarks.emoji.balance import main as balance

        return balance(argv[1:])
    if argv[:1] == ["crossfit"]:
        from benchmarks.emoji.crossfit import main as crossfit

        return crossfit(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks.emoji", description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=REGIMES, default="absent",
                    help="absent: the targets are not in the base's pretraining; rare: they are, rarely")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help="held-out groups, comma-separated; a+b joins subcategories into one group")
    ap.add_argument("--train-on", choices=TRAIN_ON, default=Protocol.train_on,
                    help="RECO training pairs: base and novel concepts, base only, or novel only")
    ap.add_argument("--tune", choices=TUNE, default=Protocol.tune, help="reco train --tune")
    ap.add_argument("--gate", action=argparse.BooleanOptionalAction, default=Protocol.gate,
                    help="reco train --gate: the per-query gate between query and memory")
    ap.add_argument("--gate-features", choices=tuple(GATE_SETS), default=Protocol.gate_features,
                    help="reco train --gate-features: what the gate sees")
    ap.add_argument("--gate-temperature", action=argparse.BooleanOptionalAction, default=Protocol.gate_temperature,
                    help="reco train --gate-temperature: the gate also sets each query's sharpness")
    ap.add_argument("--gate-hidden", type=int, default=Protocol.gate_hidden,
                    help="reco train --gate-hidden: the gate's hidden width (0: linear in its signals)")
    ap.add_argument("--loss", choices=LOSSES, default=Protocol.loss,
                    help="reco train --loss: the paper's three terms (reco), or fused vs fused alone (fused)")
    ap.add_argument("--second-look", choices=("google", "none"), default="+".join(Protocol.second_look) or "none",
                    help="also classify the targets' drawings by this vendor with the same models (pooled beside "
                    "the facebook drawings in the summary); none: facebook's only")
    ap.add_argument("--batching", choices=BATCHING, default=Protocol.batching,
                    help="reco train --batching")
    ap.add_argument("--query-noise", type=float, default=Protocol.query_noise, help="reco train --query-noise")
    ap.add_argument("--rare-weight", type=float, default=BaseConfig.rare_weight,
                    help="rare regime: a rare emoji's chance to enter a pretraining batch, relative to a common one")
    ap.add_argument("--val-vendor", choices=("facebook", "google"), default=Protocol.val_vendor,
                    help="whose drawings of the unseen concepts RECO validates on (google: the training pairs' vendor)")
    ap.add_argument("--pair-vendor", choices=("google", "facebook"), default=Protocol.pair_vendor,
                    help="whose drawings of the base and novel concepts RECO trains on")
    ap.add_argument("--ablations", action="store_true",
                    help="also the paper's plain layer, identity start, cross search, uni fusion and the swap")
    ap.add_argument("--epochs", type=int, default=Protocol.epochs, help="RECO training epochs")
    ap.add_argument("--lr", type=float, default=Protocol.lr, help="RECO training's learning rate")
    ap.add_argument("--held-vendors", default="+".join(Protocol.held_vendors),
                    help="'+'-joined vendors whose drawings of the held-out subcategories RECO trains on "
                         "(--train-on unseen): facebook, google")
    ap.add_argument("--pretrain-steps", type=int, default=BaseConfig.steps, help="base image tower steps")
    ap.add_argument("--augment", choices=("geometric", "strong"), default=BaseConfig.augment,
                    help="base pretraining augmentation (strong adds flips, ink / saturation jitter, grayscale)")
    ap.add_argument("--max-targets", type=int, default=None, help="keep the first N target emoji (reduced run)")
    ap.add_argument("--base-only", action="store_true",
                    help="only pretrain (or find cached) the base model of each seed, e.g. to warm the cache")
    split(ap)
    shared(ap, seeds="0")
    args = ap.parse_args(argv)
    seeds = listed(ap, "--seeds", args.seeds)
    held_vendors = tuple(v for v in args.held_vendors.split("+") if v)  # Protocol says what it takes

    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    written = []
    for seed in seeds:
        p = Protocol(targets=[t.strip() for t in args.targets.split(",") if t.strip()], regime=args.regime,
                     seed=seed, epochs=args.epochs, lr=args.lr, held_vendors=held_vendors, unseen_val=args.unseen_val,
                     novel_pairs=args.novel_pairs,
                     query_noise=args.query_noise, batching=args.batching, tune=args.tune, gate=args.gate,
                     gate_features=args.gate_features, gate_temperature=args.gate_temperature,
                     gate_hidden=args.gate_hidden, loss=args.loss,
                     second_look=() if args.second_look == "none" else (args.second_look,),
                     val_vendor=args.val_vendor, pair_vendor=args.pair_vendor, train_on=args.train_on,
                     max_targets=args.max_targets,
                     max_rest=args.max_others,
                     ablations=args.ablations,
                     base=BaseConfig(steps=args.pretrain_steps, augment=args.augment, rare_weight=args.rare_weight))
        if args.base_only:
            base_model(p, Path(args.home).resolve(), concepts(p, Path(args.cache)), log)
            continue
        started = dt.datetime.now(dt.timezone.utc)
        result = run(p, Path(args.home).resolve(), Path(args.cache), log)
        result = {"benchmark": "emoji: RECO vs the frozen base on held-out fine-grained emoji",
                  "command": "python -m benchmarks.emoji " + " ".join(argv),
                  "started": started.isoformat(), "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
                  "versions": data.versions(), **result}
        out = Path(args.out_dir) / _result_name(p)
        written.append(out.name)
        write_result(out, result)
        out.with_suffix(".md").write_text(markdown(result))
        plot(result, out.with_suffix(".png"))
        log(markdown(result))
        log(f"-> {out} (+ .md, .png)")
    if any(re.fullmatch(r"emoji-[a-z]+-s\d+\.json", name) for name in written):  # a default-protocol run
        _summary(["--dir", args.out_dir])
    return 0


def _result_name(p: Protocol) -> str:
    """emoji-REGIME-sSEED.json for the default protocol (what the summary reads); a run with other settings names
    what differs, so it never overwrites a default run."""
    from dataclasses import fields

    default = Protocol(regime=p.regime)
    parts = [p.regime]
    if p.targets != default.targets:
        parts.append("_".join(t.replace("+", "_") for t in p.targets))
    for f in fields(Protocol):
        value = getattr(p, f.name)
        if f.name not in ("targets", "regime", "seed", "base") and value != getattr(default, f.name):
            parts.append(f.name + ("+".join(map(str, value)) if isinstance(value, tuple) else str(value)))
    for f in fields(BaseConfig):
        if getattr(p.base, f.name) != getattr(default.base, f.name):
            parts.append(f"base_{f.name}{getattr(p.base, f.name)}")
    return f"emoji-{'-'.join(parts)}-s{p.seed}.json"


def _runs(d: Path) -> dict[str, list[dict]]:
    """{regime: the default-protocol runs (emoji-REGIME-sSEED.json) in folder d}."""
    runs = {r: [json.loads(f.read_text()) for f in sorted(d.glob(f"emoji-{r}-s*.json"))
                if re.fullmatch(rf"emoji-{r}-s\d+\.json", f.name)] for r in REGIMES}
    if not any(runs.values()):
        raise SystemExit(f"no emoji-REGIME-sSEED.json result in {d}: run `python -m benchmarks.emoji` first")
    return runs


def _summary(argv) -> int:
    """Means and standard deviations over seeds, per regime and group, of every default-protocol run found; with
    --dirs, the runs of several folders (replications of one protocol on other bases) pooled as one sample."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.emoji summary", description=_summary.__doc__)
    ap.add_argument("--dir", default=str(RESULTS), help="the folder whose runs are summarised (and where it goes)")
    ap.add_argument("--dirs", default=None,
                    help="comma-separated folders of runs of one protocol: emoji-replications.{json,md} in --out-dir")
    ap.add_argument("--out-dir", default=str(RESULTS), help="with --dirs: where the pooled summary goes")
    args = ap.parse_args(argv)
    if args.dirs:
        try:
            summary, md = replications({d: _runs(Path(d)) for d in args.dirs.split(",") if d.strip()})
        except ValueError as e:
            raise SystemExit(str(e))
        out = Path(args.out_dir) / "emoji-replications.json"
    else:
        summary, md = summarize(_runs(Path(args.dir)))
        out = Path(args.dir) / "emoji-summary.json"
    write_result(out, summary)
    out.with_suffix(".md").write_text(md)
    log(md)
    log(f"-> {out} (+ .md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
