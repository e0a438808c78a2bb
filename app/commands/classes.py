"""`reco classes`: class sets, the classes of a zero-shot classifier as versioned store collections."""

from __future__ import annotations

import sys

import click

from ..errors import RecoError
from .output import echo_json, table


@click.group()
def classes() -> None:
    """Class sets: class embeddings in the vector store, for zero-shot classification over very many classes
    (`reco eval classification --classes NAME`). Versioned like memories: build, list, show, activate, verify,
    delete."""


@classes.command("build")
@click.argument("name")
@click.option("--names", "names_file", required=True,
              help="One class name per line, or JSONL with an id and a name per line ({\"id\", \"name\"}, or "
                   "OVEN's {\"wikidata_id\", \"wikipedia_title\"}).")
@click.option("--backbone", default=None, help="Encode with this backbone: frozen class embeddings only.")
@click.option("--model", default=None, help="A trained model: its backbone encodes the prompts and its text side "
              "refines them with its memory (frozen and RECO embeddings side by side).")
@click.option("--memory", default=None, help="With --model: refine from NAME or NAME@VERSION (default: the "
              "model's memory, active version).")
@click.option("--templates", default=None, help="A file of prompt templates, one per line, with {c} "
              "(default: the 4 generic CLIP templates).")
@click.option("--activate", is_flag=True, help="Make the version active as soon as it is ready.")
@click.option("--quantization", type=click.Choice(["auto", "none", "int8", "binary"]), default="auto",
              show_default=True, help="How the class vectors are kept (auto: int8 once the set gets a graph).")
@click.option("--on-disk", is_flag=True, help="Keep the original vectors memory-mapped on disk.")
@click.pass_obj
def classes_build(rt, name, names_file, backbone, model, memory, templates, activate, quantization, on_disk) -> None:
    """Encode every class of a names file and store the class embeddings as the next version of NAME."""
    from ..classes import build_class_set
    from ..datasets import read_templates
    from ..store.base import Storage

    v = build_class_set(rt, name, names_file, backbone=backbone, model=model, memory=memory,
                        templates=read_templates(templates) if templates else None, activate=activate,
                        storage=Storage(quantization, on_disk), progress=True)
    d = _summary(rt, name, v.version)
    if d["status"] != "ready":
        raise RecoError(f"class set {name} v{v.version} {d['status']}: {d['error']}")
    click.echo(f"{name} v{v.version} ready{' (active)' if d['active'] else ''}: {d['items_stored']} classes"
               + (f", refined by {d['details']['refined']['model']}" if d["details"].get("refined") else ""))


def _summary(rt, name: str, version: int | None) -> dict:
    from ..memory import CLASSES, get_memory, get_version, summary

    with rt.db.session() as s:
        mem = get_memory(s, name, CLASSES)
        d = summary(s, get_version(s, name, version, kind=CLASSES), mem.active_version_id)
    return {"name": name, **d, "details": d.get("details") or {}}


@classes.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def classes_list(rt, as_json) -> None:
    """Every class set with its versions."""
    from ..memory import CLASSES, list_memories

    out = list_memories(rt, kind=CLASSES)
    if as_json:
        echo_json(out)
        return
    rows = [[m["name"], v["version"], v["status"] + (" *" if v["active"] else ""), v["items_stored"],
             ((v.get("details") or {}).get("refined") or {}).get("model", "-"), v["backbone"], v["created_at"][:19]]
            for m in out for v in m["versions"]]
    table(rows, ["NAME", "VERSION", "STATUS", "CLASSES", "REFINED BY", "BACKBONE", "CREATED"])
    if rows:
        click.echo("(* = active)")


@classes.command("show")
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="Default: the active version, else the newest.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def classes_show(rt, name, version, as_json) -> None:
    """One version: status, classes, backbone, templates, what refined it, storage."""
    d = _summary(rt, name, version)
    if d["status"] in ("ready", "retired"):
        d["storage"] = rt.store.storage(d["collection"])
    if as_json:
        echo_json(d)
        return
    for k in ("name", "version", "status", "active", "backbone", "dim", "source", "collection", "items_stored",
              "created_at", "ready_at", "activated_at", "error"):
        if d.get(k) is not None:
            click.echo(f"{k:14} {d[k]}")
    det = d["details"]
    click.echo(f"{'templates':14} {len(det.get('templates', []))}: {' | '.join(det.get('templates', [])[:4])}")
    r = det.get("refined")
    click.echo(f"{'refined':14} " + (f"by {r['model']} ({r['checkpoint']}), k={r['k']}, memory {r['memory']} "
                                     f"v{r['memory_version']}" if r else "no (frozen class embeddings only)"))
    if d.get("storage"):
        click.echo(f"{'storage':14} {d['storage']['quantization']} vectors (asked: {d['quantization']}), "
                   f"originals {'on disk' if d['storage']['on_disk'] else 'in RAM'}")


@classes.command("activate")
@click.argument("name")
@click.argument("version", type=int)
@click.pass_obj
def classes_activate(rt, name, version) -> None:
    """Make VERSION the one `--classes NAME` reads (atomic)."""
    from ..memory import CLASSES, activate

    activate(rt, name, version, kind=CLASSES)
    click.echo(f"{name} v{version} is active")


@classes.command("verify")
@click.argument("name")
@click.option("--version", "version", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def classes_verify(rt, name, version, as_json) -> None:
    """Reconcile the metadata with the vector store; exit 1 on any mismatch."""
    from dataclasses import asdict

    from ..memory import CLASSES, verify

    r = verify(rt, name, version, kind=CLASSES)
    if as_json:
        echo_json({**asdict(r), "ok": r.ok})
    else:
        click.echo(f"{name} v{r.version} ({r.status}): metadata {r.shard_sum}, store {r.store_count}")
        for p in r.problems:
            click.echo(f"  MISMATCH: {p}")
        click.echo("OK" if r.ok else "FAILED")
    if not r.ok:
        sys.exit(1)


@classes.command("delete")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--force", is_flag=True, help="Also delete the active version.")
@click.pass_obj
def classes_delete(rt, name, version, force) -> None:
    """Delete one version: its metadata and its vector collection."""
    from ..memory import CLASSES, delete

    delete(rt, name, version, force=force, kind=CLASSES)
    click.echo(f"deleted {name} v{version}")
