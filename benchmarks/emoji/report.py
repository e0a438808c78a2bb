"""The benchmark's table (markdown) and plot (PNG)."""

from __future__ import annotations

from pathlib import Path


def markdown(r: dict) -> str:
    h = r["headline"]
    base = h["baseline_top1"]
    lines = [f"Held-out targets: {', '.join(r['protocol']['targets'])} ({h['classes']} classes, "
             f"{len(r['targets'])} facebook images); memory: twitter "
             f"({r['n_memory_v2']} emoji); seed {r['protocol']['seed']}; headline k = {h['k']}.", "",
             "| | top-1 % | top-5 % | Δ top-1 vs baseline |", "|---|---|---|---|"]
    for name, m in r["table"].items():
        delta = "" if name == "frozen baseline" else f"{m['top1'] - base:+.1f}"
        lines.append(f"| {name} | {m['top1']:.1f} | {m['top5']:.1f} | {delta} |")
    c = r["ceilings"]
    lines += ["", f"Ceilings (k = 1): a facebook image's nearest twitter image is its own emoji "
                  f"{c['image_to_image']:.1f} %; a class prompt's nearest memory caption is its own class "
                  f"{c['text_to_text']:.1f} %."
              + (f" Memory swap recovers {100 * h['swap_recovery']:.0f} % of the gain with no retraining."
                 if h["swap_recovery"] is not None else "")]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["table"])
    top1 = [r["table"][n]["top1"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(names) + 1.2))
    colors = ["#888888" if n == "frozen baseline" else "#2b6cb0" if n.startswith("RECO") else "#d69e2e"
              for n in names]
    ax.barh(range(len(names)), top1, color=colors)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(top1[0], color="#888888", lw=0.8, ls="--")
    for i, v in enumerate(top1):
        ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=7)
    ax.set_xlabel("top-1 accuracy (%)")
    ax.set_title(f"RECO on held-out emoji ({', '.join(r['protocol']['targets'])}, "
                 f"{r['headline']['classes']} classes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
