"""Which recipe for training the gate on held-out subcategories carries over to other held-out subcategories?
Cross-fitting on non-target data only.

    python -m benchmarks.emoji crossfit --regime rare --seeds 0,1,2

    python -m benchmarks.emoji crossfit --vendors facebook,facebook+google   # also google's drawings train

    python -m benchmarks.emoji crossfit --features scores,rivals   # what the gate sees (app/gate.py's sets)

    python -m benchmarks.emoji crossfit --temperature off,on   # does the gate also set each query's sharpness?

    python -m benchmarks.emoji crossfit --loss reco,fused   # the paper's three loss terms, or fused vs fused alone

    python -m benchmarks.emoji crossfit --hidden 0,16   # a linear gate, or one hidden layer of 16 units

Per seed: the protocol's held-out subcategories (its validation and `dev` concepts) in two folds of about equal
size. The protocol's gated layers, only the gate learning, are trained with each recipe (the vendors whose drawings
train × lr × epochs × what the gate sees × whether it also sets the sharpness × the loss × the gate's hidden width;
one vendor's drawings of one subcategory per batch, the last step kept) on one fold and scored on the other fold's
facebook drawings, each told apart among its own subcategory's captions; then the folds swap. Pooled over folds and
seeds: each recipe's accuracy minus the untrained start's on the same drawings, with a paired bootstrap. `--train-on
unseen` (the protocol's default) trains the picked recipe on all the held-out subcategories, so every drawing the
recipe was judged on was out of its fold's training. No target is read.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter
from pathlib import Path

import numpy as np

from app.gate import GATE_SETS
from app.train import LOSSES

from .args import listed, shared, split
from .data import versions
from .protocol import (HELD_VENDORS, Protocol, _train_cfg, concepts, held_out_home, held_out_shards,
                       held_vendors_ok)
from .report import BOOTSTRAP, paired_gains

VENDORS = ("facebook",)  # sets of HELD_VENDORS, '+'-joined
FEATURES = ("scores",)  # app/gate.py's GATE_SETS
TEMPERATURE = (False,)  # reco train --gate-temperature
LOSS = ("reco",)  # reco train --loss
HIDDEN = (0,)  # reco train --gate-hidden
SWITCH = {False: "off", True: "on"}
LRS = (1e-2, 3e-2, 1e-1)
EPOCHS = (5, 10, 20, 40)
START = ("start", "", 0, "", False, "", 0)


def folds(unseen: list) -> list[list[str]]:
    """The held-out subcategories in two folds of about equal drawings: largest first, each to the smaller fold."""
    sizes = Counter(e.subcategory for e in unseen)
    out, total = [[], []], [0, 0]
    for sub in sorted(sizes, key=lambda s: (-sizes[s], s)):
        i = int(total[1] < total[0])
        out[i].append(sub)
        total[i] += sizes[sub]
    return [sorted(f) for f in out]


def _split(p: Protocol) -> str:
    """'' for the protocol's concept shares, else '-unseen<share>-novel<share>' (result and save names)."""
    default = (p.unseen_val, p.novel_pairs) == (Protocol.unseen_val, Protocol.novel_pairs)
    return "" if default else f"-unseen{p.unseen_val:g}-novel{p.novel_pairs:g}"


def _saved(p: Protocol, home: Path) -> Path:
    return home / "runs" / f"crossfit-{p.regime}{_split(p)}-s{p.seed}.npz"


def fold_hits(p: Protocol, home: Path, cache: Path, lrs=LRS, epochs=EPOCHS, log=print, reuse: bool = False,
              vendors=VENDORS, features=FEATURES, temperature=TEMPERATURE, loss=LOSS, hidden=HIDDEN) -> dict:
    """{(vendors, lr, epochs, features, temperature, loss, hidden): bool per held-out facebook drawing, out of fold}
    for one seed; START is the untrained start on the same drawings (fold 1's drawings, then fold 0's). `vendors`
    are '+'-joined sets of vendors whose drawings train, `features` names of app/gate.py's sets (what the gate
    sees), `temperature` whether the gate also sets each query's sharpness (reco train --gate-temperature), `loss`
    names of reco train --loss, `hidden` the gate's hidden widths (reco train --gate-hidden). Saved beside the
    seed's run; `reuse` loads a saved seed that holds every recipe asked for (its base cache key must not have
    changed)."""
    grid = list(itertools.product(vendors, lrs, epochs, features, temperature, loss, hidden))
    wanted = [START, *grid]
    if reuse and _saved(p, home).is_file():
        with np.load(_saved(p, home), allow_pickle=False) as z:
            saved = {_key(name): z[name] for name in z.files}
        if all(k in saved for k in wanted):
            log(f"{p.regime} seed {p.seed}: held-out hits from {_saved(p, home)}")
            return {k: saved[k] for k in wanted}
    import torch

    from app import checkpoint
    from app.db.models import FusionModel
    from app.fusion import build
    from app.train import NeighbourCache, TrainConfig, create_job, evaluate, fusion_config, load_pairs, run_training

    memories = lambda unseen: {_memory(i, v): held_out_shards(subs, v.split("+"))  # noqa: E731
                               for i, subs in enumerate(folds(unseen)) for v in sorted({p.val_vendor, *vendors})}
    _, rt = held_out_home(p, home, cache, "crossfit", memories, log)

    def scored(name: str, untrained: bool = False) -> np.ndarray:
        """The model's hits on its job's validation fold (the layers at step 0 when `untrained`)."""
        with rt.db.session() as s:
            m = s.query(FusionModel).filter_by(name=name).one()
            job, dim, ckdir = m.config["job"], m.dim, Path(m.checkpoint_dir)
        cfg = TrainConfig(**job["train"])
        vjob = {**job, "pairs": job["val_pairs"]}
        pairs = load_pairs(rt, vjob["pairs"][2], vjob["pairs"][3])
        nbrs = NeighbourCache(rt, vjob, cfg, dim, "cpu").get(pairs)
        model = build(fusion_config(cfg, dim), cfg.seed)
        if not untrained:
            model.load_state_dict(checkpoint.load(ckdir, "best")[0])
        return evaluate(model, pairs, nbrs, np.arange(len(pairs.ids)), cfg.batch_size, torch.device("cpu"),
                        "shard", hits=True)["hits"]

    out: dict = {}
    for train, val in ((0, 1), (1, 0)):
        for v, lr, ep, feats, temp, objective, width in grid:
            name = f"fold{train}-{v}-lr{lr:.0e}-e{ep}{'' if feats == 'scores' else '-' + feats}{'-temp' * temp}" \
                + ("" if objective == "reco" else f"-{objective}") + (f"-h{width}" if width else "")
            name = name.replace("+", "_").replace(".", "_")
            # the protocol's training as `--train-on unseen` runs it; validating on the other fold only records it
            create_job(rt, name, _memory(train, v), "twitter", _train_cfg(
                p, lr=lr, epochs=ep, batching="shard", select="last", val_pairs=_memory(val, p.val_vendor),
                gate_features=feats, gate_temperature=temp, loss=objective, gate_hidden=width))
            run_training(rt, name, progress=False)
            out.setdefault((v, lr, ep, feats, temp, objective, width), []).append(scored(name))
        out.setdefault(START, []).append(scored(name, untrained=True))
    hits = {key: np.concatenate(parts) for key, parts in out.items()}
    np.savez(_saved(p, home), **{_name(k): v for k, v in hits.items()})
    log(f"{p.regime} seed {p.seed}: {len(hits[START])} held-out drawings in two folds, start "
        f"{100 * hits[START].mean():.1f} %, best recipe here "
        + "{:+.1f}".format(100 * max(h.mean() - hits[START].mean() for k, h in hits.items() if k != START)))
    return hits


def _memory(fold: int, vendors: str) -> str:
    return f"fold{fold}-{vendors.replace('+', '_')}"


def _name(key) -> str:
    return "start" if key == START else f"{key[0]}_{key[1]!r}_{key[2]}_{key[3]}" + "_temperature" * key[4] \
        + ("" if key[5] == "reco" else f"_{key[5]}") + (f"_h{key[6]}" if key[6] else "")


def _key(name: str):
    if name == "start":
        return START
    # saved before round seven: no features (the gate saw "scores"); before round eight: no temperature; before
    # round nine: no loss (the paper's); before round ten: no hidden width (a linear gate)
    v, lr, ep, *rest = name.split("_")
    flags = rest[1:]
    widths = [int(x[1:]) for x in flags if x[:1] == "h" and x[1:].isdigit()]
    return v, float(lr), int(ep), rest[0] if rest else "scores", "temperature" in flags, \
        next((x for x in flags if x in LOSSES), "reco"), widths[0] if widths else 0


def recipes(per_seed: list[dict]) -> list[dict]:
    """Per recipe: pooled out-of-fold accuracy, minus the start, with its paired bootstrap 95 % interval."""
    return [{"vendors": key[0], "lr": key[1], "epochs": key[2], "features": key[3], "temperature": key[4],
             "loss": key[5], "hidden": key[6], **gain}
            for key, gain in paired_gains(per_seed, START).items() if key != START]


def pick(best: dict) -> dict | None:
    """The recipe of the highest pooled out-of-fold gain (`best`), if that gain is more than one standard error (of
    the paired bootstrap) above the start; else None: keep the untrained start. `reco train --select 1se`'s rule,
    over recipes instead of checkpoints."""
    return best if best["minus_start"] > best["se"] else None


def markdown(r: dict) -> str:
    feats = lambda c: c.get("features", "scores")  # noqa: E731 (a result from before round seven: scores)
    temp = lambda c: c.get("temperature", False)  # noqa: E731 (... before round eight: a fixed sharpness)
    loss = lambda c: c.get("loss", "reco")  # noqa: E731 (... before round nine: the paper's loss)
    width = lambda c: c.get("hidden", 0)  # noqa: E731 (... before round ten: a linear gate)
    cells = {(c["vendors"], feats(c), temp(c), loss(c), width(c), c["lr"], c["epochs"]): c for c in r["recipes"]}
    vendors = sorted({c["vendors"] for c in r["recipes"]}, key=len)
    sets = sorted({feats(c) for c in r["recipes"]}, key=list(GATE_SETS).index)
    temps = sorted({temp(c) for c in r["recipes"]})
    losses = sorted({loss(c) for c in r["recipes"]}, key=LOSSES.index)
    widths = sorted({width(c) for c in r["recipes"]})
    sharp = lambda t: "| per query " if t else "| fixed " if temps != [False] else ""  # noqa: E731
    objective = lambda x: f"| {x} " if losses != ["reco"] else ""  # noqa: E731
    form = lambda h: (f"| {h} hidden " if h else "| linear ") if widths != [0] else ""  # noqa: E731
    lrs, eps = sorted({c["lr"] for c in r["recipes"]}), sorted({c["epochs"] for c in r["recipes"]})
    lines = [f"### {r['regime']} regime: held-out subcategories, out-of-fold top-1 minus the untrained start, by "
             f"recipe (gate only, one vendor's drawings of one subcategory per batch; scored on facebook drawings, "
             f"pooled over seeds {', '.join(map(str, r['seeds']))} and both folds, {r['images']} drawings)", "",
             "| trained on | gate sees " + ("| sharpness " if temps != [False] else "")
             + ("| loss " if losses != ["reco"] else "") + ("| gate " if widths != [0] else "") + "| lr \\ epochs | "
             + " | ".join(map(str, eps)) + " |",
             "|" + "---|" * (len(eps) + 3 + (temps != [False]) + (losses != ["reco"]) + (widths != [0]))]
    cell = lambda c: f"{c['minus_start']:+.1f} [{c['ci95_low']:+.1f}, {c['ci95_high']:+.1f}]"  # noqa: E731
    for v, f, t, o, h, lr in itertools.product(vendors, sets, temps, losses, widths, lrs):
        lines.append(f"| {v} | {f} {sharp(t)}{objective(o)}{form(h)}| {lr:g} | "
                     + " | ".join(cell(cells[(v, f, t, o, h, lr, e)]) for e in eps) + " |")
    b = r["best"]
    lines += ["", f"Start: {r['start_top1']:.1f} %. Highest: {b['vendors']}, gate sees {feats(b)}"
              + (", sets each query's sharpness" if temp(b) else "")
              + (f", loss {loss(b)}" if losses != ["reco"] else "")
              + ((f", {width(b)} hidden units" if width(b) else ", linear gate") if widths != [0] else "")
              + f", lr {b['lr']:g}, "
              f"{b['epochs']} epochs, "
              f"{b['minus_start']:+.1f} [{b['ci95_low']:+.1f}, {b['ci95_high']:+.1f}], standard error {b['se']:.1f} "
              "(per seed " + ", ".join(f"{a - s:+.1f}" for a, s in zip(b["per_seed"], r["start_per_seed"]))
              + "): " + ("more than one standard error above the start, so `--train-on unseen` trains it"
                         if r["pick"] else "within one standard error of the start, so RECO keeps the start")
              + ". Folds: " + "; ".join(f"seed {s}: {' | '.join(', '.join(f) for f in fs)}"
                                        for s, fs in r["folds"].items()) + ".", ""]
    return "\n".join(lines)


def main(argv) -> int:
    from benchmarks.common import log, write_result

    ap = argparse.ArgumentParser(prog="python -m benchmarks.emoji crossfit", description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=("absent", "rare"), default="rare")
    ap.add_argument("--vendors", default=",".join(VENDORS),
                    help="sets of vendors whose held-out drawings train, comma-separated, each '+'-joined")
    ap.add_argument("--features", default=",".join(FEATURES),
                    help=f"what the gate sees: sets of app/gate.py ({', '.join(GATE_SETS)}), comma-separated")
    ap.add_argument("--temperature", default=",".join(SWITCH[t] for t in TEMPERATURE),
                    help="off: the score softmax's sharpness stays fixed; on: the gate also sets it per query "
                         "(reco train --gate-temperature); comma-separated")
    ap.add_argument("--loss", default=",".join(LOSS),
                    help=f"reco train --loss: {' and/or '.join(LOSSES)} (the paper's three terms, or fused vs fused "
                         "alone), comma-separated")
    ap.add_argument("--hidden", default=",".join(map(str, HIDDEN)),
                    help="reco train --gate-hidden: the gate's hidden widths (0: linear in its signals), "
                         "comma-separated")
    ap.add_argument("--lrs", default=",".join(f"{x:g}" for x in LRS), help="learning rates, comma-separated")
    ap.add_argument("--epochs", default=",".join(map(str, EPOCHS)), help="epoch counts, comma-separated")
    split(ap)
    ap.add_argument("--reuse", action="store_true",
                    help="take a seed's held-out hits saved by an earlier run (under --home) when it has every recipe")
    shared(ap)
    args = ap.parse_args(argv)
    seeds, epochs = listed(ap, "--seeds", args.seeds), listed(ap, "--epochs", args.epochs)
    hidden = listed(ap, "--hidden", args.hidden)
    if not hidden or min(hidden) < 0:
        ap.error(f"--hidden takes widths >= 0 (0: a linear gate), comma-separated, not {args.hidden!r}")
    lrs = listed(ap, "--lrs", args.lrs, float)
    vendors = [v.strip() for v in args.vendors.split(",") if v.strip()]
    if not vendors or not all(held_vendors_ok(v.split("+")) for v in vendors):
        ap.error(f"--vendors takes sets of {' and '.join(HELD_VENDORS)}, '+'-joined, not {args.vendors!r}")
    features = [f.strip() for f in args.features.split(",") if f.strip()]
    if not features or not set(features) <= set(GATE_SETS):
        ap.error(f"--features takes {', '.join(GATE_SETS)}, comma-separated, not {args.features!r}")
    temperature = [t.strip() for t in args.temperature.split(",") if t.strip()]
    if not temperature or not set(temperature) <= set(SWITCH.values()):
        ap.error(f"--temperature takes off and/or on, comma-separated, not {args.temperature!r}")
    temperature = [t == "on" for t in temperature]
    loss = [x.strip() for x in args.loss.split(",") if x.strip()]
    if not loss or not set(loss) <= set(LOSSES):
        ap.error(f"--loss takes {' and/or '.join(LOSSES)}, comma-separated, not {args.loss!r}")
    protocols = [Protocol(regime=args.regime, seed=s, max_rest=args.max_others, unseen_val=args.unseen_val,
                          novel_pairs=args.novel_pairs) for s in seeds]
    home, cache = Path(args.home).resolve(), Path(args.cache)
    per_seed = [fold_hits(p, home, cache, lrs, epochs, log, reuse=args.reuse, vendors=vendors, features=features,
                          temperature=temperature, loss=loss, hidden=hidden) for p in protocols]
    cells = recipes(per_seed)
    best = max(cells, key=lambda c: c["minus_start"])
    start = paired_gains(per_seed, START)[START]
    result = {"benchmark": "emoji crossfit: gate recipes trained on held-out subcategories, scored out of fold",
              "command": "python -m benchmarks.emoji crossfit " + " ".join(argv), "regime": args.regime,
              "seeds": seeds, "images": int(sum(len(h[START]) for h in per_seed)), "start_top1": start["top1"],
              "start_per_seed": start["per_seed"], "bootstrap": BOOTSTRAP,
              "folds": {str(p.seed): folds(concepts(p, cache)["unseen"]) for p in protocols},
              "unseen_val": args.unseen_val, "novel_pairs": args.novel_pairs, "best": best, "pick": pick(best),
              "recipes": cells, "versions": versions()}
    # a grid over other vendors, gate features, sharpness, loss or gate form than the default's, or other concept
    # shares, gets its own file
    tag = ("-vendors" if tuple(vendors) != VENDORS else "") + ("-features" if tuple(features) != FEATURES else "") \
        + ("-temperature" if tuple(temperature) != TEMPERATURE else "") + ("-loss" if tuple(loss) != LOSS else "") \
        + ("-hidden" if tuple(hidden) != HIDDEN else "") + _split(protocols[0])
    out = Path(args.out_dir) / f"emoji-crossfit-{args.regime}{tag}{'-reduced' if args.max_others else ''}.json"
    write_result(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    log(markdown(result))
    log(f"-> {out} (+ .md)")
    return 0
