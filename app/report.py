"""Reading evaluation runs: a side-by-side table, plots, and a self-contained HTML gallery."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

HEADLINE = {"zeroshot_classification": ("acc1", "acc5", "mean_per_class_recall"),
            "zeroshot_retrieval": ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1",
                                   "text_to_image_R@5")}
GROUPS = ("seen", "unseen", "harmonic_mean")  # OVEN's top-1 accuracies, shown when a run has them


def compare_rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per (run, baseline|RECO@k); one column per metric of the runs' task(s)."""
    metrics = []
    for r in runs:
        for m in HEADLINE[r["task"]] + tuple(g for g in GROUPS if g in r["baseline"]):
            if m not in metrics:
                metrics.append(m)
    headers = ["RUN", "DATASET", "MODEL", "MEMORY", "VARIANT"] + [m.upper() for m in metrics]
    rows = []
    for r in runs:
        mem = f"{r['memory']['name']}@{r['memory']['version']}"
        variants = [("frozen baseline", r["baseline"])] + [
            (f"RECO k={k} ({r['retrieval']})", r["reco"][str(k)]) for k in r["k"]]
        for name, vals in variants:
            rows.append([str(r["run"]), r["dataset"], r["model"], mem, name]
                        + [f"{100 * vals[m]:.2f}" if m in vals else "" for m in metrics])
    return headers, rows


def plot_runs(runs: list[dict], out_dir: Path) -> list[Path]:
    """accuracy_vs_k.png (RECO top-1 against k, baseline dashed) and baseline_vs_reco.png (bars per dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        key = HEADLINE[r["task"]][0]
        ks = r["k"]
        line = ax.plot(ks, [100 * r["reco"][str(k)][key] for k in ks], marker="o",
                       label=f"run {r['run']} {r['dataset']} RECO")[0]
        ax.axhline(100 * r["baseline"][key], linestyle="--", color=line.get_color(), label=f"run {r['run']} baseline")
    ax.set_xlabel("k (retrieved neighbours)")
    ax.set_ylabel("top-1 / R@1 (%)")
    ax.set_title("RECO vs frozen baseline")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "accuracy_vs_k.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs)), 4))
    labels = [f"{r['run']}: {r['dataset'].split(':')[0]}" for r in runs]
    base = [100 * r["baseline"][HEADLINE[r["task"]][0]] for r in runs]
    best = [100 * max(r["reco"][str(k)][HEADLINE[r["task"]][0]] for k in r["k"]) for r in runs]
    xs = range(len(runs))
    ax.bar([x - 0.2 for x in xs], base, width=0.4, label="frozen baseline")
    ax.bar([x + 0.2 for x in xs], best, width=0.4, label="RECO (best k)")
    ax.set_xticks(list(xs), labels, rotation=20, fontsize=8)
    ax.set_ylabel("top-1 / R@1 (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out_dir / "baseline_vs_reco.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def data_uri(image, size: int = 96) -> str:
    """A PNG thumbnail of `image` as a data: URI (pages that carry their own pictures)."""
    im = image.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery(run: dict, out: Path, limit: int = 100) -> Path:
    """A self-contained HTML page (images inlined): each query beside its retrieved images and captions,
    with the baseline's and RECO's predictions marked right or wrong."""
    from PIL import Image

    from .corpus import read_source_images

    details = run.get("details") or []
    if not details:
        from .errors import RecoError

        raise RecoError(f"run {run['run']} has no per-query details to show (galleries need a classification run)")
    sources = read_source_images({(i, j): nb.get("src") for i, d in enumerate(details[:limit])
                                  for j, nb in enumerate(d["neighbours"])})
    rows = []
    for i, d in enumerate(details[:limit]):
        try:
            with Image.open(d["image"]) as im:
                q = data_uri(im.convert("RGB"))
        except OSError:
            continue
        cells = []
        for j, nb in enumerate(d["neighbours"]):
            src = sources[(i, j)]
            img = f'<img src="{data_uri(src, 64)}" alt="">' if src is not None else '<div class="noimg">n/a</div>'
            cells.append(f'<figure>{img}<figcaption>{html.escape(str(nb.get("caption")))}'
                         f'<br><small>{nb["score"]:.3f}</small></figcaption></figure>')

        def mark(pred):
            ok = pred == d["label"]
            return f'<span class="{"ok" if ok else "bad"}">{"✓" if ok else "✗"} {html.escape(pred)}</span>'

        rows.append(f'<tr><td><img class="q" src="{q}" alt=""><br><b>{html.escape(d["label"])}</b></td>'
                    f'<td>baseline: {mark(d["baseline"])}<br>RECO: {mark(d["reco"])}</td>'
                    f'<td class="nb">{"".join(cells)}</td></tr>')
    title = f"RECO run {run['run']}: {run['dataset']} / {run['model']} / memory {run['memory']['name']}@{run['memory']['version']}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}}table{{border-collapse:collapse}}td{{border-top:1px solid #ccc;
padding:6px;vertical-align:top}}img.q{{width:96px}}.nb figure{{display:inline-block;margin:2px;width:80px;
font-size:10px;text-align:center}}.ok{{color:#070}}.bad{{color:#b00}}.noimg{{width:64px;height:64px;background:#eee}}
</style></head><body><h1>{html.escape(title)}</h1>
<p>baseline top-1 {100 * run['baseline'].get('acc1', 0):.2f}% &middot; RECO top-1 {100 * run['metrics'].get('acc1', 0):.2f}%
(k={run['headline_k']}, retrieval {run['retrieval']}) &middot; leakage guard: {run['leakage_guard']['excluded_items']}
memory items excluded</p>
<table><tr><th>query</th><th>predictions</th><th>retrieved (image side)</th></tr>{''.join(rows)}</table></body></html>"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
