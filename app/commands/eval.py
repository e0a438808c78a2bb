"""`reco eval`: zero-shot evaluations, the frozen baseline and RECO side by side, and their reports."""

from __future__ import annotations

import click

from ..errors import RecoError
from .output import echo_json, table


@click.group("eval")
def eval_group() -> None:
    """Zero-shot evaluations: frozen baseline and RECO side by side."""


def _ks(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise RecoError(f"-k takes a comma-separated list of integers, got {text!r}") from exc


_eval_options = [
    click.option("--model", required=True, help="A trained RECO model (`reco model list`)."),
    click.option("--memory", default=None, help="NAME or NAME@VERSION (default: the model's memory, active version)."),
    click.option("-k", "ks", default=None, help="Neighbours, one or a list: -k 1,5,10 (default: the model's k)."),
    click.option("--guard/--no-guard", default=True, show_default=True,
                 help="Keep copies of the evaluation images out of retrieval."),
    click.option("--checkpoint", type=click.Choice(["best", "start"]), default="best", show_default=True,
                 help="The trained checkpoint, or the same layers untrained (what training must beat)."),
    click.option("--seed", default=0, show_default=True),
    click.option("--batch-size", default=64, show_default=True),
    click.option("--json", "as_json", is_flag=True, help="Print the whole result JSON."),
]


def _with_eval_options(fn):
    for opt in reversed(_eval_options):
        fn = opt(fn)
    return fn


def _print_run(run: dict, as_json: bool) -> None:
    from ..report import compare_rows

    if as_json:
        echo_json({k: v for k, v in run.items() if k != "details"})
        return
    headers, rows = compare_rows([run])
    table(rows, headers)
    g = run["leakage_guard"]
    click.echo(f"run {run['run']}: {run['n_images']} images"
               + (f", skipped {run['skipped']}" if run.get("skipped") else "")
               + f"; leakage guard {'on' if g['enabled'] else 'off'}: {g['excluded_items']} memory items excluded"
               + (" (not from the class set's text side, refined when it was built)"
                  if g.get("class_text_side") and g["excluded_items"] else ""))
    if run.get("classes"):
        c = run["classes"]
        click.echo(f"classes: {c['name']} v{c['version']}, {c['count']} classes, ranked by "
                   f"{'a top-k search of the store' if c['ranking'] == 'search' else 'the dense matrix'}")


@eval_group.command("classification")
@click.option("--dataset", required=True, help="KIND:PATH, e.g. cub:/data/CUB_200_2011, imagefolder:/data/x or "
              "oven:/data/oven.")
@click.option("--classnames", default=None, help="imagefolder: class names: `folder<TAB>name` lines or a JSON "
              "object {folder: name}; a plain list (one name per line) only for folders named like the classes "
              "in the same sorted order, or numbered 0..n-1 / 1..n.")
@click.option("--templates", default=None, help="A file of prompt templates, one per line, with {c}.")
@click.option("--retrieval", type=click.Choice(["both", "image", "text", "none"]), default="both", show_default=True)
@click.option("--classes", default=None, help="Rank against a stored class set (NAME or NAME@VERSION, `reco "
              "classes build`) instead of the dataset's class names: its ids must cover the dataset's classes.")
@click.option("--ranking", type=click.Choice(["auto", "dense", "search"]), default="auto", show_default=True,
              help="With --classes: the class matrix in RAM (dense) or a top-k search of the store; auto picks "
                   "by the set's size.")
@click.option("--ef", type=click.IntRange(1, 100_000), default=None,
              help="With --ranking search: the graph search's width (default 512; wider is slower and closer to "
                   "the exact ranking).")
@_with_eval_options
@click.pass_obj
def eval_classification(rt, dataset, classnames, templates, retrieval, classes, ranking, ef, model, memory, ks,
                        guard, checkpoint, seed, batch_size, as_json) -> None:
    """Zero-shot classification: acc1, acc5, mean per-class recall (OVEN: seen, unseen, harmonic mean)."""
    from ..evaluate import evaluate_classification

    if (ranking != "auto" or ef) and not classes:
        raise RecoError("--ranking and --ef apply to a stored class set: give --classes NAME")
    run = evaluate_classification(rt, model, dataset, memory=memory, ks=_ks(ks) if ks else None,
                                  retrieval=retrieval, guard=guard, seed=seed, batch_size=batch_size,
                                  classnames=classnames, templates=templates, checkpoint=checkpoint,
                                  classes=classes, ranking=ranking, ef=ef)
    _print_run(run, as_json)


@eval_group.command("retrieval")
@click.option("--dataset", required=True, help="karpathy:/path/dataset_coco.json (or dataset_flickr30k.json).")
@click.option("--images-root", default=None, help="Folder the JSON's filepath/filename are relative to.")
@click.option("--retrieval", type=click.Choice(["both", "image", "text", "none"]), default="text", show_default=True,
              help="Which side retrieves (the paper's best for retrieval tasks: text).")
@_with_eval_options
@click.pass_obj
def eval_retrieval(rt, dataset, images_root, retrieval, model, memory, ks, guard, checkpoint, seed, batch_size,
                   as_json) -> None:
    """Zero-shot image-text retrieval: recall@1/5/10 both ways (every caption of an image is a positive)."""
    from ..evaluate import evaluate_retrieval

    run = evaluate_retrieval(rt, model, dataset, memory=memory, ks=_ks(ks) if ks else None, retrieval=retrieval,
                             guard=guard, seed=seed, batch_size=batch_size, images_root=images_root,
                             checkpoint=checkpoint)
    _print_run(run, as_json)


@eval_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def eval_list(rt, as_json) -> None:
    """Every stored evaluation run."""
    from ..db.models import Evaluation

    with rt.db.session() as s:
        runs = [{"run": e.id, "task": e.task, "model": e.model_name, "memory": f"{e.memory_name}@{e.memory_version}",
                 "dataset": e.dataset, "k": e.ks, "retrieval": e.retrieval, "guard": bool(e.leakage_guard),
                 "metrics": e.metrics, "timing": e.timing, "result": e.result_path,
                 "created_at": e.created_at.isoformat()} for e in s.query(Evaluation).order_by(Evaluation.id)]
    if as_json:
        echo_json(runs)
        return
    from ..report import HEADLINE

    def head(r, which):
        key = HEADLINE[r["task"]][0]
        vals = r["metrics"]["baseline"] if which == "base" else r["metrics"]["reco"][str(max(r["k"]))]
        return f"{100 * vals[key]:.2f}"

    table([[r["run"], r["task"].replace("zeroshot_", ""), r["model"], r["memory"], r["dataset"],
            ",".join(map(str, r["k"])), head(r, "base"), head(r, "reco"), r["created_at"][:19]] for r in runs],
          ["RUN", "TASK", "MODEL", "MEMORY", "DATASET", "K", "BASELINE", "RECO(max k)", "CREATED"])


@eval_group.command("compare")
@click.argument("runs", nargs=-1, type=int, required=True)
@click.pass_obj
def eval_compare(rt, runs) -> None:
    """Side-by-side table of runs: baseline and RECO at every k, every metric."""
    from ..evaluate import load_run
    from ..report import compare_rows

    headers, rows = compare_rows([load_run(rt, r) for r in runs])
    table(rows, headers)


@eval_group.command("plot")
@click.argument("runs", nargs=-1, type=int, required=True)
@click.option("--out", "out_dir", default=None, help="Folder for the PNGs (default $RECO_HOME/plots).")
@click.pass_obj
def eval_plot(rt, runs, out_dir) -> None:
    """PNGs: accuracy vs k, and baseline vs RECO per dataset."""
    from pathlib import Path

    from ..evaluate import load_run
    from ..report import plot_runs

    for p in plot_runs([load_run(rt, r) for r in runs], Path(out_dir) if out_dir else rt.settings.home / "plots"):
        click.echo(str(p))


@eval_group.command("gallery")
@click.argument("run", type=int)
@click.option("--out", default=None, help="HTML file (default $RECO_HOME/galleries/run-N.html).")
@click.option("--limit", default=100, show_default=True, help="Queries on the page.")
@click.pass_obj
def eval_gallery(rt, run, out, limit) -> None:
    """A self-contained HTML page: queries, their retrieved images and captions, right and wrong predictions."""
    from pathlib import Path

    from ..evaluate import load_run
    from ..report import gallery

    path = Path(out) if out else rt.settings.home / "galleries" / f"run-{run}.html"
    click.echo(str(gallery(load_run(rt, run), path, limit)))
