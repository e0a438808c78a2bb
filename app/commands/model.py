"""`reco model`: trained RECO models."""

from __future__ import annotations

import json

import click

from ..errors import RecoError
from .common import val_line
from .output import echo_json, table


@click.group()
def model() -> None:
    """Trained RECO models."""


def _model_dict(row) -> dict:
    job = row.config.get("job", {})
    return {"name": row.name, "status": row.status, "backbone": row.backbone, "dim": row.dim,
            "memory": row.memory_name, "trained_with_memory_version": row.memory_version,
            "pairs": f"{row.pairs_name}@{row.pairs_version}", "step": row.step, "train": job.get("train"),
            "metrics": row.metrics, "error": row.error, "checkpoint_dir": row.checkpoint_dir,
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "updated_at": row.updated_at.isoformat() if row.updated_at else None}


def _get_model(s, name):
    from ..db.models import FusionModel

    row = s.query(FusionModel).filter_by(name=name).one_or_none()
    if row is None:
        raise RecoError(f"no model named {name!r} (see `reco model list`)")
    return row


@model.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def model_list(rt, as_json) -> None:
    """Every model with its memory and validation result."""
    from ..db.models import FusionModel

    with rt.db.session() as s:
        out = [_model_dict(r) for r in s.query(FusionModel).order_by(FusionModel.name)]
    if as_json:
        echo_json(out)
        return

    def val(m):
        v = ((m["metrics"] or {}).get("best") or {}).get("val") or {}
        if not v:
            return ""
        start = (m["metrics"] or {}).get("start")
        return f"{v['acc']:.3f} ({start['acc']:.3f} / {v['baseline_acc']:.3f})" if start else \
            f"{v['acc']:.3f} (- / {v['baseline_acc']:.3f})"

    table([[m["name"], m["status"], m["memory"], m["pairs"], m["step"], val(m), m["backbone"]] for m in out],
          ["NAME", "STATUS", "MEMORY", "PAIRS", "STEP", "VAL ACC (START / FROZEN)", "BACKBONE"])


@model.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def model_show(rt, name, as_json) -> None:
    """Config, provenance and training metrics of one model."""
    with rt.db.session() as s:
        d = _model_dict(_get_model(s, name))
    if as_json:
        echo_json(d)
        return
    for key in ("name", "status", "backbone", "dim", "memory", "trained_with_memory_version", "pairs", "step",
                "checkpoint_dir", "created_at", "updated_at", "error"):
        if d.get(key) is not None:
            click.echo(f"{key:28} {d[key]}")
    click.echo("train " + json.dumps(d["train"]))
    line = val_line(d["metrics"])
    if line:
        click.echo(line)
    final = (d["metrics"] or {}).get("final")
    if final:
        click.echo("final " + json.dumps(final))


@model.command("export")
@click.argument("name")
@click.argument("directory")
@click.pass_obj
def model_export(rt, name, directory) -> None:
    """Write a trained model to DIRECTORY: fusion weights (safetensors), config, model card, SHA256SUMS."""
    from ..transfer.model import export_model

    c = export_model(rt, name, directory)
    click.echo(f"model {c['name']} ({c['backbone']}, k={c['k']}, trained with {c['memory']['name']}"
               f"@{c['memory']['version']}) -> {directory}")


@model.command("import")
@click.argument("directory")
@click.option("--as", "name", default=None, help="Model name (default: the exported one).")
@click.option("--memory", default=None, help="Memory it retrieves from (default: the one it was trained with); "
                                             "it must hold vectors of the model's backbone.")
@click.pass_obj
def model_import(rt, directory, name, memory) -> None:
    """Register a model bundle: every file's sum and the memory's backbone checked first."""
    from ..transfer.model import import_model

    c = import_model(rt, directory, name=name, memory=memory)
    click.echo(f"model {c['name']} imported, retrieving from memory {c['memory']['name']}")


@model.command("delete")
@click.argument("name")
@click.pass_obj
def model_delete(rt, name) -> None:
    """Delete a model's row and checkpoints."""
    import shutil

    with rt.db.session() as s:
        row = _get_model(s, name)
        ckdir = row.checkpoint_dir
        s.delete(row)
    shutil.rmtree(ckdir, ignore_errors=True)
    click.echo(f"deleted model {name}")
