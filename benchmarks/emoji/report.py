"""The benchmark's tables (markdown), plot (PNG) and the summary over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# the summary's second look at the targets: their google drawings, then both vendors' together (protocol.second_look)
SECOND_LOOK = (("google",), ("facebook", "google"))
# what the summary averages over seeds, per regime and group (points, 0-100)
SUMMARY_KEYS = ("baseline_top1", "untrained_top1", "reco_top1", "retrieval_off_top1", "no_target_memory_top1",
                "t2i_r1_baseline", "t2i_r1_untrained", "t2i_r1_reco")


def _subcategories(subs: dict) -> str:
    """`arrow 21, office 23`: validation subcategories and their sizes."""
    return ", ".join(f"{s} {n}" for s, n in subs.items())


def markdown(r: dict) -> str:
    p = r["protocol"]
    held = p.get("train_on") == "unseen"
    pairs = (f"RECO trains on the held-out concepts' facebook drawings, {r['n_train_pairs']}, and keeps the last "
             f"step of a recipe fixed by cross-fitting them (no validation is left); held out" if held else
             f"RECO training pairs: {r['n_train_pairs']} ({r['n_novel_pairs']} of them concepts the base knows as "
             f"it knows the targets); validation")
    lines = [f"Regime **{p['regime']}**, seed {p['seed']}; memory: twitter ({r['n_memory_v2']} emoji); {pairs}: "
             f"{r['n_unseen_val_pairs']} unseen concepts"
             + (f" in {len(subs)} whole subcategories ({_subcategories(subs)})"
                if (subs := r.get("validation_subcategories")) else "") + ".", ""]
    for name, m in r["training"].items():
        lines.append(f"- {name}: validation {m['start']['acc']:.3f} untrained → {m['best']['score']:.3f} at step "
                     f"{m['best']['step']} of {m['steps']} (frozen {m['best']['val']['baseline_acc']:.3f})"
                     if m["start"] else f"- {name}: {m['steps']} steps, the last kept")
    for g, res in r["groups"].items():
        h = res["headline"]
        base, start = h["baseline_top1"], h["untrained_top1"]
        lines += ["", f"### {g} ({h['classes']} classes)", "",
                  "| | top-1 % | top-5 % | Δ top-1 vs baseline | Δ top-1 vs untrained start |",
                  "|---|---|---|---|---|"]
        for name, m in res["table"].items():
            d_base = "" if name == "frozen baseline" else f"{m['top1'] - base:+.1f}"
            d_start = "" if name in ("frozen baseline", "untrained start (step 0)") else f"{m['top1'] - start:+.1f}"
            lines.append(f"| {name} | {m['top1']:.1f} | {m['top5']:.1f} | {d_base} | {d_start} |")
        lines += ["", "| retrieval (one caption per drawing) | text→image R@1 | R@5 | image→text R@1 | R@5 |",
                  "|---|---|---|---|---|"]
        for name, m in res["retrieval"].items():
            lines.append(f"| {name} | {m['t2i_r1']:.1f} | {m['t2i_r5']:.1f} | {m['i2t_r1']:.1f} | {m['i2t_r5']:.1f} |")
        c = res["ceilings"]
        lines += ["", f"Ceilings (k = 1): a facebook drawing's nearest twitter drawing is its own emoji "
                      f"{c['image_to_image']:.1f} %; a class prompt's nearest memory caption is its own class "
                      f"{c['text_to_text']:.1f} %."
                  + (f" Memory swap recovers {100 * h['swap_recovery']:.0f} % of the gain with no retraining."
                     if h.get("swap_recovery") is not None else "")]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(r["groups"])
    rows = ["frozen baseline", "untrained start (step 0)", f"RECO k={r['protocol']['headline_k']}",
            "retrieval-off training control", "memory without the targets"]
    colors = ["#888888", "#9ab6d6", "#2b6cb0", "#d69e2e", "#c05621"]
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 3, 3.6))
    width = 0.8 / len(rows)
    for j, (name, color) in enumerate(zip(rows, colors)):
        vals = [r["groups"][g]["table"][name]["top1"] for g in groups]
        xs = np.arange(len(groups)) + (j - (len(rows) - 1) / 2) * width
        ax.bar(xs, vals, width, label=name, color=color)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"RECO on held-out emoji, {r['protocol']['regime']} regime, seed {r['protocol']['seed']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BOOTSTRAP = 10_000  # resamples of the paired bootstrap
DEV = "dev"


def paired_gains(per_seed: list[dict], start) -> dict:
    """{key: pooled top-1, minus the start's, and its paired bootstrap 95 % interval} for per-seed dicts of
    {key: bool hits on that seed's drawings} (the key `start` among them): drawings are resampled with replacement
    within each seed, every key and the start on the same resample. For non-target diagnostics (validation)."""
    rng = np.random.default_rng(0)
    base = [h[start].astype(float) for h in per_seed]
    draws = [rng.integers(len(b), size=(BOOTSTRAP, len(b))) for b in base]
    n = sum(len(b) for b in base)
    out = {}
    for key in per_seed[0]:
        diffs = [h[key].astype(float) - b for h, b in zip(per_seed, base)]
        boot = sum(d[ix].sum(axis=1) for d, ix in zip(diffs, draws)) / n
        low, high = 100 * np.percentile(boot, [2.5, 97.5])
        acc = 100 * sum(h[key].sum() for h in per_seed) / n
        out[key] = {"top1": float(acc), "minus_start": float(acc - 100 * sum(b.sum() for b in base) / n),
                    "ci95_low": float(low), "ci95_high": float(high), "se": float(100 * boot.std()),
                    "per_seed": [float(100 * h[key].mean()) for h in per_seed]}
    return out


def _hits(group: dict, vendor: str) -> dict | None:
    """A group's per-image top-1 hits on one vendor's drawings: facebook's are the group's own, others its
    `second_look`'s; None where the run lacks them."""
    return group.get("top1_hits") if vendor == "facebook" else group.get("second_look", {}).get(vendor, {}).get(
        "top1_hits")


def _hit_arrays(rs: list[dict], groups: list[str], vendors: tuple[str, ...]) -> dict | None:
    """{model: float hits [seeds, emoji, vendors]} over the groups' target drawings; None where a run lacks them."""
    if not groups or any(_hits(r["groups"].get(g, {}), v) is None for r in rs for g in groups for v in vendors):
        return None
    return {m: np.array([[[c == "1" for g in groups for c in _hits(r["groups"][g], v)[m]] for v in vendors]
                         for r in rs], float).transpose(0, 2, 1) for m in ("baseline", "untrained", "reco")}


def pooled(rs: list[dict], vendors: tuple[str, ...] = ("facebook",)) -> dict | None:
    """Top-1 over every target image of a regime, each group still classified among its own names, averaged over
    seeds; and the 95 % interval of a paired bootstrap for RECO − untrained start and RECO − baseline: images and
    seeds are resampled with replacement, the same images (they are the same drawings in every seed) for all three
    models, so what varies between models stays paired. With several `vendors` an image is a target emoji and its
    vendors' drawings are resampled together (they are one concept, not independent samples). None when a run
    lacks the per-image hits."""
    groups = [g for g in rs[0]["groups"] if g != DEV]
    hits = _hit_arrays(rs, groups, vendors)
    if hits is None:
        return None
    n_seeds, n_images, _ = hits["reco"].shape
    rng = np.random.default_rng(0)
    diffs = {"untrained": hits["reco"] - hits["untrained"], "baseline": hits["reco"] - hits["baseline"]}
    boot = {m: [] for m in diffs}
    for start in range(0, BOOTSTRAP, 500):
        b = min(500, BOOTSTRAP - start)
        si = rng.integers(n_seeds, size=(b, n_seeds))
        ii = rng.integers(n_images, size=(b, n_images))
        for m, d in diffs.items():
            boot[m].append(d[si[:, :, None], ii[:, None, :]].mean(axis=(1, 2, 3)))
    ci = {m: 100 * np.percentile(np.concatenate(v), [2.5, 97.5]) for m, v in boot.items()}
    top = {m: 100 * float(h.mean()) for m, h in hits.items()}
    return {"vendors": list(vendors), "classes": int(sum(rs[0]["groups"][g]["headline"]["classes"] for g in groups)),
            "images": n_images * len(vendors), "emoji": n_images,
            "groups": groups, "baseline_top1": top["baseline"], "untrained_top1": top["untrained"],
            "reco_top1": top["reco"], "reco_minus_untrained": top["reco"] - top["untrained"],
            "ci95_low": float(ci["untrained"][0]), "ci95_high": float(ci["untrained"][1]),
            "reco_minus_baseline": top["reco"] - top["baseline"],
            "ci95_low_vs_baseline": float(ci["baseline"][0]), "ci95_high_vs_baseline": float(ci["baseline"][1]),
            "reco_minus_untrained_per_seed": [100 * float(d.mean()) for d in diffs["untrained"]],
            "seeds": [r["protocol"]["seed"] for r in rs], "bootstrap": BOOTSTRAP}


def _pooled_header(label: str) -> list[str]:
    return [f"| {label} | classes | images | baseline | untrained start | RECO | RECO − untrained [95 % CI] | "
            "RECO − baseline [95 % CI] | seeds |", "|---|---|---|---|---|---|---|---|---|"]


def _pooled_row(label: str, pool: dict) -> str:
    return (f"| {label} | {pool['classes']} | {pool['images']} | {pool['baseline_top1']:.1f} | "
            f"{pool['untrained_top1']:.1f} | **{pool['reco_top1']:.1f}** | "
            f"**{pool['reco_minus_untrained']:+.1f}** [{pool['ci95_low']:+.1f}, {pool['ci95_high']:+.1f}] | "
            f"{pool['reco_minus_baseline']:+.1f} [{pool['ci95_low_vs_baseline']:+.1f}, "
            f"{pool['ci95_high_vs_baseline']:+.1f}] | {', '.join(map(str, pool['seeds']))} |")


def summarize(runs: dict[str, list[dict]]) -> tuple[dict, str]:
    """(emoji-summary.json, its markdown): per regime, the pooled rows with their paired bootstrap intervals
    (`pooled`) and, where the runs hold it, the second look at the same targets (SECOND_LOOK), then per group the
    mean over seeds of SUMMARY_KEYS, the standard deviation of RECO's top-1 and of its gain over the untrained
    start, and the seeds."""
    out: dict = {"regimes": {}}
    lines = ["### pooled over every target image (mean over seeds; 95 % paired bootstrap over images and seeds)", "",
             *_pooled_header("regime")]
    pools = {regime: pooled(rs) if rs else None for regime, rs in runs.items()}
    lines += [_pooled_row(regime, pool) for regime, pool in pools.items() if pool is not None]
    second = {regime: {"+".join(v): pool for v in SECOND_LOOK if (pool := pooled(rs, v)) is not None}
              for regime, rs in runs.items() if rs}
    if any(second.values()):
        lines += ["", "### second look: the same targets' google drawings, classified by the same models "
                      "(facebook + google: a target's two drawings resampled together)", "",
                  *_pooled_header("regime, drawings")]
        lines += [_pooled_row(f"{regime}, {v}", pool) for regime, by_vendors in second.items()
                  for v, pool in by_vendors.items()]
    lines.append("")
    for regime, rs in runs.items():
        if not rs:
            continue
        per: dict = {}
        for g in rs[0]["groups"]:
            hs = [r["groups"][g]["headline"] for r in rs if g in r["groups"]]
            vals = {k: [h[k] for h in hs] for k in SUMMARY_KEYS}
            gain = np.subtract(vals["reco_top1"], vals["untrained_top1"])
            per[g] = {**{k: float(np.mean(v)) for k, v in vals.items()},
                      "reco_top1_std": float(np.std(vals["reco_top1"])),
                      "reco_minus_untrained_std": float(np.std(gain)),
                      "classes": hs[0]["classes"], "seeds": [r["protocol"]["seed"] for r in rs if g in r["groups"]]}
        pool = pools[regime]
        out["regimes"][regime] = {**per, **({"pooled": pool} if pool is not None else {}),
                                  **({"second_look": second[regime]} if second[regime] else {})}
        lines += [f"### {regime} regime (mean over seeds {', '.join(map(str, next(iter(per.values()))['seeds']))})",
                  "", "| group | classes | baseline | untrained start | RECO (± std) | RECO − untrained | "
                      "retrieval-off control | memory without targets | text→image R@1 baseline → RECO |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g, m in per.items():
            lines.append(f"| {g} | {m['classes']} | {m['baseline_top1']:.1f} | {m['untrained_top1']:.1f} | "
                         f"**{m['reco_top1']:.1f}** ± {m['reco_top1_std']:.1f} | "
                         f"{m['reco_top1'] - m['untrained_top1']:+.1f} | {m['retrieval_off_top1']:.1f} | "
                         f"{m['no_target_memory_top1']:.1f} | {m['t2i_r1_baseline']:.1f} → {m['t2i_r1_reco']:.1f} |")
        val = {r["protocol"]["seed"]: r["validation_subcategories"] for r in rs if "validation_subcategories" in r}
        if val:
            out["regimes"][regime]["validation_subcategories"] = {str(k): v for k, v in val.items()}
            lines += ["", "Held-out subcategories (RECO's training or validation pairs, `dev`): " + "; ".join(
                f"seed {seed}: {_subcategories(subs)}" for seed, subs in val.items()) + "."]
        lines.append("")
    return out, "\n".join(lines)


# Protocol fields in which runs may differ and still be pooled as replications of one protocol: the seed (its base
# and split) and what was measured beside the bar's reading
REPLICATION_FREE = ("seed", "second_look")
# fields the protocol gained after runs were written, with the value those runs had
ADDED_FIELDS = {"held_vendors": ["facebook"], "gate_features": "scores", "gate_temperature": False, "loss": "reco",
                "gate_hidden": 0}


def _protocol(run: dict) -> dict:
    return {k: v for k, v in {**ADDED_FIELDS, **run["protocol"]}.items() if k not in REPLICATION_FREE}


def images_only(rs: list[dict]) -> dict | None:
    """The 95 % interval of pooled RECO − untrained start with the runs held fixed and only the target drawings
    resampled: the part of `pooled`'s interval that more seeds or bases cannot remove, since every run classifies
    the same drawings. None where a run lacks the per-image hits."""
    hits = _hit_arrays(rs, [g for g in rs[0]["groups"] if g != DEV], ("facebook",))
    if hits is None:
        return None
    per_image = (hits["reco"] - hits["untrained"]).mean(axis=(0, 2))  # each drawing's gain, mean over runs
    draws = np.random.default_rng(0).integers(len(per_image), size=(BOOTSTRAP, len(per_image)))
    low, high = 100 * np.percentile(per_image[draws].mean(axis=1), [2.5, 97.5])
    return {"ci95_low": float(low), "ci95_high": float(high), "runs": len(rs)}


def replications(sources: dict[str, dict[str, list[dict]]]) -> tuple[dict, str]:
    """(emoji-replications.json, its markdown): the runs of one protocol that several result folders hold (a round
    rerun on rebuilt bases, another machine) pooled per regime as one sample of bases: each run is a base, resampled
    as `pooled` resamples seeds, with `summarize`'s per-group means over every base; then each folder's own pooled
    row and `images_only` (how narrow more bases could make the interval). Runs whose protocols differ in anything
    but REPLICATION_FREE are refused: they are not replications."""
    regimes = sorted({regime for runs in sources.values() for regime, rs in runs.items() if rs})
    combined = {regime: [r for runs in sources.values() for r in runs.get(regime, [])] for regime in regimes}
    for regime, rs in combined.items():
        ref = _protocol(rs[0])
        for name, runs in sources.items():
            for r in runs.get(regime, []):
                if (p := _protocol(r)) != ref:
                    diff = sorted(k for k in ref.keys() | p.keys() if ref.get(k) != p.get(k))
                    raise ValueError(f"{name}: {regime} seed {r['protocol']['seed']} differs from the first run in "
                                     f"{', '.join(diff)}: runs of other protocols are not replications")
    summary, md = summarize(combined)
    out = {"sources": {name: {"runs": {regime: [r["protocol"]["seed"] for r in rs] for regime, rs in runs.items()
                                       if rs},
                              "cpu": sorted({(r.get("versions", {}).get("cpu") or {}).get("model", "?")
                                             for rs in runs.values() for r in rs})}
                       for name, runs in sources.items()}, "regimes": summary["regimes"]}
    lines = [f"Pooled over {', '.join(f'{len(rs)} {regime}' for regime, rs in combined.items())} runs of one "
             f"protocol from {len(sources)} result folders; each run is one base, resampled as a seed.", "",
             "| folder | CPU | runs |", "|---|---|---|"]
    lines += [f"| {name} | {', '.join(s['cpu'])} | "
              f"{'; '.join(f'{regime} {len(seeds)}' for regime, seeds in s['runs'].items())} |"
              for name, s in out["sources"].items()]
    lines += ["", md, "### each folder's pooled row", "", *_pooled_header("regime, folder")]
    for regime in regimes:
        per_source = {name: pool for name, runs in sources.items() if runs.get(regime)
                      and (pool := pooled(runs[regime])) is not None}
        drawings = images_only(combined[regime])
        out["regimes"][regime].update({"per_source": per_source, **({"images_only": drawings} if drawings else {})})
        lines += [_pooled_row(f"{regime}, {name}", pool) for name, pool in per_source.items()]
    intervals = [f"{regime} [{o['ci95_low']:+.1f}, {o['ci95_high']:+.1f}]" for regime in regimes
                 if (o := out["regimes"][regime].get("images_only"))]
    if intervals:
        lines += ["", f"Resampling only the target drawings (every run kept): RECO − untrained 95 % interval "
                      f"{'; '.join(intervals)}."]
    return out, "\n".join(lines)
