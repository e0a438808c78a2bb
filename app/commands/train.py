"""`reco train`: train RECO's fusion transformers."""

from __future__ import annotations

import click

from ..errors import RecoError
from .common import val_line, warn_without_workers


@click.command()
@click.argument("model_name")
@click.option("--pairs", required=True, help="Memory whose pairs train the fusion (NAME or NAME@VERSION).")
@click.option("--memory", required=True, help="Memory to retrieve from (NAME or NAME@VERSION); may equal --pairs.")
@click.option("-k", "k", default=10, show_default=True, help="Neighbours per query.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--weight-decay", default=0.05, show_default=True)
@click.option("--warmup-steps", default=50, show_default=True)
@click.option("--search", type=click.Choice(["uni", "cross"]), default="uni", show_default=True,
              help="uni: image->image, text->text; cross: image->text, text->image.")
@click.option("--fusion", type=click.Choice(["cross", "uni"]), default="cross", show_default=True,
              help="cross: fuse the other modality of the hits; uni: the same modality.")
@click.option("--val-fraction", default=0.1, show_default=True, help="Share of the pairs held out for validation.")
@click.option("--val-by", type=click.Choice(["concept", "item"]), default="concept", show_default=True,
              help="Hold out whole concepts (pairs sharing a caption) or single items.")
@click.option("--val-pairs", default=None, help="Validate on this memory's pairs (NAME or NAME@VERSION) instead "
              "of held-out training pairs, e.g. concepts the backbone never saw; trains on all of --pairs.")
@click.option("--val-batching", type=click.Choice(["random", "similar", "shard"]), default=None,
              help="Validation batches (default: as --batching). shard: one batch per shard of the validation pairs, "
              "so each image is told apart among its own group's captions (one fine-grained set per shard).")
@click.option("--seed", default=0, show_default=True)
@click.option("--checkpoint-every", default=200, show_default=True, help="Steps between checkpoints.")
@click.option("--select", type=click.Choice(["best", "1se", "last"]), default="best", show_default=True,
              help="Checkpoint inference uses: the best validation accuracy, the earliest within one standard "
              "error of it (with --val-pairs on concepts the backbone never saw), or the last step (a recipe fixed "
              "beforehand; with --val-fraction 0 every pair trains).")
@click.option("--heads", type=int, default=None, help="Attention heads (default dim/64).")
@click.option("--dropout", default=0.0, show_default=True)
@click.option("--neighbour-dropout", default=0.1, show_default=True)
@click.option("--rank/--no-rank", "use_rank", default=True, show_default=True, help="Learned rank embedding.")
@click.option("--score/--no-score", "use_score", default=True, show_default=True,
              help="Retrieval score added to the attention logits (off: the paper's plain form).")
@click.option("--init", type=click.Choice(["retrieval", "identity"]), default="retrieval", show_default=True,
              help="Start as score-weighted retrieval fusion (generalises to unseen concepts) or as the identity.")
@click.option("--score-scale", default=100.0, show_default=True, help="Initial 1/temperature of the score softmax.")
@click.option("--query-noise", default=0.0, show_default=True,
              help="Training only: noise of this norm on each frozen query the layers refine, so the base is unsure "
              "of every pair and the memory pays (try 0.5-1 when the pairs are concepts the backbone knows well).")
@click.option("--tune", type=click.Choice(["all", "attention", "scalars", "gate"]), default="all", show_default=True,
              help="attention: only where each side looks learns; values, output projection and MLP keep their start. "
              "scalars: only the memory's weight against the query and the score scale learn. gate: only the "
              "per-query gate learns (needs --gate).")
@click.option("--gate/--no-gate", default=False, show_default=True,
              help="A learned per-query weight between the query and the memory term, from how sure and how "
              "consistent its neighbours are; at step 0 the model equals the ungated start.")
@click.option("--gate-features", default="scores", show_default=True,
              help="What the gate sees: scores (retrieval scores and neighbour agreement), rivals (also the top-1's "
              "gap to and agreement with the runner-up, and the query's cosine to the top-1), or signal names, "
              "comma-separated (app/gate.py GATE_SIGNALS).")
@click.option("--gate-temperature", is_flag=True, default=False,
              help="The gate also sets, per query, how sharply the memory term follows the top-1 neighbour (the score "
              "softmax's scale times e^z, z from the same signals; 1 at step 0). Needs --gate.")
@click.option("--gate-hidden", type=click.IntRange(min=0), default=0, show_default=True,
              help="The gate's hidden width: 0 reads its signals linearly; H > 0 through one hidden layer of H tanh "
              "units, so one signal can weigh another (its output still starts at zero). Needs --gate.")
@click.option("--loss", type=click.Choice(["reco", "fused"]), default="reco", show_default=True,
              help="reco: the paper's three contrastive terms (fused image vs fused text, and each fused side vs the "
              "other's frozen embedding). fused: only fused vs fused, the comparison zero-shot classification makes "
              "when both sides retrieve.")
@click.option("--batching", type=click.Choice(["random", "similar", "shard"]), default="random", show_default=True,
              help="similar: each batch is a group of pairs with near captions, so in-batch negatives are hard. "
              "shard: each batch is one shard of the pairs (in chunks of --batch-size), for pairs written one "
              "fine-grained group per shard.")
@click.option("--retrieval/--no-retrieval", default=True, show_default=True,
              help="--no-retrieval masks every neighbour: the control that trains the same layers without memory.")
@click.option("--dedup-threshold", type=float, default=0.98, show_default=True,
              help="Drop neighbours whose search score is above this (near-duplicates of the pair); 1 disables.")
@click.option("--score-threshold", type=float, default=None, help="Drop neighbours scoring below this.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1 (default RECO_DEVICE, else cuda when present).")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16"]), default="fp32", show_default=True,
              help="fp32: exact float32 steps. tf32: float32 matmuls in TF32 on CUDA for this run only (faster on "
              "Ampere and later). bf16: forward and loss under bfloat16 autocast (CUDA or CPU); weights, optimizer "
              "state and validation stay float32.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for a queued job (distributed).")
@click.option("--timeout", type=float, default=None)
@click.pass_obj
def train(rt, model_name, pairs, memory, wait, timeout, **options) -> None:
    """Train RECO's fusion transformers: queue `train` (in-process with a progress bar when embedded).

    Rerunning an interrupted job with the same settings resumes it from its last checkpoint."""
    from ..train import TrainConfig, create_job, run_training

    cfg = TrainConfig(**options)
    create_job(rt, model_name, pairs, memory, cfg)
    if rt.settings.in_process_tasks:
        metrics = run_training(rt, model_name)
    else:
        from ..dispatch import dispatcher

        d = dispatcher(rt)
        d.check()
        d.send("train", model_name)
        warn_without_workers(rt, "train")
        if not wait:
            click.echo(f"{model_name}: training queued")
            return
        metrics = _wait_model(rt, model_name, timeout)
    best = metrics.get("best") or {}
    rule = f" ({best['rule']}: the highest was at step {best['top']})" if best.get("rule") == "1se" else ""
    click.echo(f"{model_name} ready: {metrics['steps']} steps, checkpoint of step {best.get('step')}{rule}")
    line = val_line(metrics)
    if line:
        click.echo(line)


def _wait_model(rt, name: str, timeout: float | None) -> dict:
    import time

    from ..db.models import FusionModel

    start = time.monotonic()
    while True:
        with rt.db.session() as s:
            row = s.query(FusionModel).filter_by(name=name).one()
            status, metrics, error = row.status, row.metrics, row.error
        if status == "ready":
            return metrics
        if status == "failed":
            raise RecoError(f"training {name} failed: {error}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise RecoError(f"model {name} still {status} after {timeout:.0f}s")
        time.sleep(1)
