"""`reco model export` / `reco model import`: a trained model as a self-contained, checked bundle.

    DIR/model.safetensors   the fusion layers (the checkpoint training picked)
    DIR/checkpoint.json     its metadata as training wrote it (fusion config, job, tensors' sha256)
    DIR/config.json         backbone spec and fingerprint, dimension, k, retrieval modes, memory and pairs it was
                            trained with, training settings and validation (untrained start, the pick, frozen)
    DIR/README.md           the model card: the same, readable, with the evaluations that used the model
    DIR/SHA256SUMS          `sha256  file` for every file above (sha256sum -c reads it)

Import checks every sum, then that the memory the model is pointed at holds vectors of the model's backbone,
before it registers anything.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

from ..backbone import hash_file
from ..errors import RecoError
from . import new_directory

FORMAT, FORMAT_VERSION = "reco-model-bundle", 1
FILES = ("model.safetensors", "checkpoint.json", "config.json", "README.md")


def export_model(rt, name: str, out: str | Path) -> dict:
    from ..db.models import Evaluation, FusionModel, ModelStatus

    out = new_directory(out)
    with rt.db.session() as s:
        row = s.query(FusionModel).filter_by(name=name).one_or_none()
        if row is None:
            raise RecoError(f"no model named {name!r} (see `reco model list`)")
        if row.status != ModelStatus.READY:
            raise RecoError(f"model {name} is {row.status}, not ready: only a trained model can be exported")
        job = row.config.get("job", {})
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": row.name, "backbone": row.backbone,
                  "backbone_hash": row.backbone_hash, "dim": row.dim, "k": job.get("train", {}).get("k"),
                  "search": job.get("train", {}).get("search"), "fusion": job.get("train", {}).get("fusion"),
                  "memory": {"name": row.memory_name, "version": row.memory_version},
                  "pairs": {"name": row.pairs_name, "version": row.pairs_version},
                  "train": job.get("train"), "job": job, "metrics": row.metrics, "step": row.step,
                  "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        ckdir = Path(row.checkpoint_dir)
        runs = [{"run": e.id, "task": e.task, "dataset": e.dataset, "memory": f"{e.memory_name}@{e.memory_version}",
                 "metrics": e.metrics} for e in s.query(Evaluation).filter_by(model_name=name).order_by(Evaluation.id)]
    for f in ("best.safetensors", "best.json"):
        if not (ckdir / f).is_file():
            raise RecoError(f"model {name}'s checkpoint {ckdir / f} is missing: retrain it or restore the files")
    from .. import checkpoint

    checkpoint.load(ckdir, "best")  # refuses a damaged checkpoint before it travels
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckdir / "best.safetensors", out / "model.safetensors")
    shutil.copyfile(ckdir / "best.json", out / "checkpoint.json")
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (out / "README.md").write_text(_card(config, runs))
    sums = "".join(f"{hash_file(out / f)}  {f}\n" for f in FILES)
    (out / "SHA256SUMS").write_text(sums)
    return config


def _card(c: dict, runs: list[dict]) -> str:
    m = c.get("metrics") or {}
    val, start = (m.get("best") or {}).get("val") or {}, m.get("start") or {}
    lines = [f"# {c['name']}: a RECO model", "",
             "Fusion layers of RECO (retrieval-enhanced CLIP) over a frozen open_clip backbone. They refine the "
             "backbone's embeddings with items retrieved from an image-text memory of the same backbone.", "",
             "## Backbone and retrieval", "",
             f"- backbone: `{c['backbone']}` (fingerprint `{c['backbone_hash']}`), {c['dim']}-d",
             f"- k = {c['k']} neighbours, search `{c['search']}`, fusion `{c['fusion']}`",
             f"- trained with memory `{c['memory']['name']}` v{c['memory']['version']}; pairs "
             f"`{c['pairs']['name']}` v{c['pairs']['version']}", "",
             "## Training", "", "```json", json.dumps(c.get("train"), indent=2, default=str), "```", "",
             "## Validation (in-batch retrieval accuracy on held-out pairs)", ""]
    if val:
        lines += ["| frozen backbone | untrained start | trained (the pick) |", "|---|---|---|",
                  f"| {val.get('baseline_acc', float('nan')):.4f} | "
                  f"{start.get('acc', float('nan')) if start else float('nan'):.4f} | {val.get('acc', float('nan')):.4f} |"]
    else:
        lines.append("not recorded")
    lines += ["", "## Evaluations that used it", ""]
    if runs:
        lines += ["| run | task | dataset | memory | metrics |", "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['task']} | `{r['dataset']}` | {r['memory']} | "
                  f"`{json.dumps(r['metrics'], default=str)[:300]}` |" for r in runs]
    else:
        lines.append("none recorded")
    lines += ["", "## Use", "", "```bash", "reco model import THIS_DIR --memory MEMORY   # a memory of the same backbone",
              "```", "", f"Exported {c['exported_at']}; `sha256sum -c SHA256SUMS` checks the files.", ""]
    return "\n".join(lines)


def read_bundle(path: str | Path) -> dict:
    root = Path(path)
    sums = root / "SHA256SUMS"
    if not root.is_dir() or not sums.is_file():
        raise RecoError(f"{root} is not a model bundle (no SHA256SUMS): give the directory `reco model export` wrote")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name.strip()] = digest.strip()
    missing = [f for f in FILES if f not in listed]
    if missing:
        raise RecoError(f"{sums} lists no sum for {', '.join(missing)}: the bundle is damaged")
    for name in FILES:
        f = root / name
        if not f.is_file():
            raise RecoError(f"{name} is missing from {root}: the bundle is incomplete")
        if hash_file(f) != listed[name]:
            raise RecoError(f"{name} does not match its sum in SHA256SUMS: the bundle was changed or damaged; "
                            "export it again")
    try:
        config = json.loads((root / "config.json").read_text())
    except ValueError as exc:
        raise RecoError(f"{root / 'config.json'} is not valid JSON: the bundle is damaged") from exc
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise RecoError(f"{root} is not a RECO model bundle of format {FORMAT_VERSION}")
    return config


def import_model(rt, path: str | Path, name: str | None = None, memory: str | None = None) -> dict:
    """Register the bundle's model as NAME, pointed at MEMORY (default: the memory it was trained with)."""
    from sqlalchemy import select

    from ..db.models import FusionModel, Memory, ModelStatus
    from ..names import check_name

    root = Path(path)
    c = read_bundle(root)
    name = name or c["name"]
    check_name(name, "model")
    memory = memory or c["memory"]["name"]
    check_name(memory)
    target = rt.settings.home / "models" / name
    with rt.db.session() as s:
        if s.query(FusionModel).filter_by(name=name).one_or_none() is not None:
            raise RecoError(f"a model named {name!r} exists: import under another name (--as) or delete it first")
        mem = s.scalar(select(Memory).where(Memory.name == memory))
        if mem is None:
            raise RecoError(f"no memory named {memory!r} here: build or import a memory of backbone {c['backbone']} "
                            "first, or point --memory at one")
        hashes = {v.backbone_hash for v in mem.versions}
        if c["backbone_hash"] not in hashes:
            raise RecoError(f"model {c['name']} was trained on backbone {c['backbone']}; memory {memory} holds "
                            f"vectors of {', '.join(sorted({v.backbone for v in mem.versions}))}: point --memory at a "
                            "memory of the model's backbone")
    _install(root, target)
    try:
        with rt.db.session() as s:
            s.add(FusionModel(name=name, status=ModelStatus.READY, backbone=c["backbone"],
                              backbone_hash=c["backbone_hash"], dim=c["dim"], memory_name=memory,
                              memory_version=c["memory"]["version"], pairs_name=c["pairs"]["name"],
                              pairs_version=c["pairs"]["version"], config={"job": c["job"]},
                              metrics=c.get("metrics") or {}, step=c.get("step") or 0, checkpoint_dir=str(target)))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # no row, no files: a refused import leaves nothing
        raise
    return {**c, "name": name, "memory": {"name": memory, "version": c["memory"]["version"]}}


def _install(root: Path, target: Path) -> None:
    """Copy the checkpoint into `target` through a staging folder that is removed on any failure, so a refused
    bundle leaves no `NAME.importing/` behind. torch is imported only here, after every cheap check passed."""
    from .. import checkpoint

    staging = target.with_name(target.name + ".importing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        shutil.copyfile(root / "model.safetensors", staging / "best.safetensors")
        shutil.copyfile(root / "checkpoint.json", staging / "best.json")
        checkpoint.load(staging, "best")  # the checkpoint's own sums agree with its tensors
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
