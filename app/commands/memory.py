"""`reco memory`: image-text memories and their versions (export and import are in memory_transfer.py)."""

from __future__ import annotations

import sys

import click

from ..errors import RecoError
from .common import report_build, run_build, version_status, warn_without_workers
from .memory_transfer import memory_export, memory_import
from .output import echo_json, table


@click.group()
def memory() -> None:
    """Image-text memories and their versions."""


@memory.command("build")
@click.argument("name")
@click.argument("source", required=False)
@click.option("--format", "fmt", type=click.Choice(["wds", "manifest", "embeddings"]), default=None,
              help="Corpus layout (default: detected from SOURCE).")
@click.option("--backbone", default=None,
              help="MODEL:TAG, MODEL:/path/weights, MODEL, or /path/config.json[:/path/weights] (required, except "
                   "with --from: a delta keeps its parent's).")
@click.option("--from", "parent", default=None, metavar="VERSION",
              help="Build a delta: VERSION's items (a number, or `active`) copied inside the store, never re-encoded, "
                   "plus SOURCE's; a key in both is updated (SOURCE's wins).")
@click.option("--remove-keys", type=click.Path(exists=True, dir_okay=False), default=None,
              help="With --from: leave out the items with these keys (a text file, one key per line; recorded as a "
                   "takedown).")
@click.option("--reason", default="", help="Why --remove-keys removes them (kept with the takedown).")
@click.option("--activate", is_flag=True, help="Make the version active as soon as it is ready.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the version is ready (distributed profile).")
@click.option("--image-column", default="image", show_default=True, help="Manifest column with image paths.")
@click.option("--caption-column", default="caption", show_default=True, help="Manifest column with captions.")
@click.option("--key-column", default=None, help="Manifest column with item keys (default: the row number).")
@click.option("--shard-size", default=10_000, show_default=True, help="Manifest rows per shard (one task each).")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.option("--quantization", type=click.Choice(["auto", "none", "int8", "binary"]), default=None,
              help="Quantized vectors, searched with rescoring from the originals; auto (the default): int8 once the "
                   "version is big enough for an HNSW graph. A delta keeps its parent's.")
@click.option("--on-disk", is_flag=True, default=None, help="Keep the original vectors memory-mapped on disk (RAM: "
                                                            "only the quantized vectors and the graph).")
@click.pass_obj
def memory_build(rt, name, source, fmt, backbone, parent, remove_keys, reason, activate, wait, image_column,
                 caption_column, key_column, shard_size, timeout, quantization, on_disk) -> None:
    """Create the next version of NAME from SOURCE (one ingest task per shard), or a delta of an existing version
    (--from): only what is new is encoded."""
    from ..build import start_build
    from ..store.base import Storage

    if source is None and not (parent and remove_keys):
        raise click.UsageError("give SOURCE (or --from VERSION with --remove-keys FILE to only remove items)")
    keys = None
    if remove_keys:
        from ..takedown import read_keys

        keys = read_keys(remove_keys)
    storage = None
    if quantization is not None or on_disk:
        storage = Storage(quantization or "auto", bool(on_disk))
    elif parent is None:
        storage = Storage()
    v = start_build(rt, name, source, backbone=backbone, fmt=fmt, activate=activate, image_column=image_column,
                    caption_column=caption_column, key_column=key_column, shard_size=shard_size, storage=storage,
                    parent=parent, remove_keys=keys, reason=reason)
    what = f"v{v.parent_version} + {source or 'nothing'}" + (f" − {len(keys)} keys" if keys else "") \
        if v.parent_version else f"building from {source}"
    click.echo(f"{name} v{v.version}: {what}", err=True)
    run_build(rt, name, v, wait, timeout)


@memory.command("forget")
@click.argument("name")
@click.option("--keys", "keys_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The keys to take down: a text file, one item key per line.")
@click.option("--all-versions", is_flag=True,
              help="Delete them in place from every existing version of NAME (and drop the training caches built "
                   "from those versions); later builds and exports of NAME leave them out too.")
@click.option("--reason", default="", help="Why (a licence withdrawn, a privacy request): kept with the takedown.")
@click.option("--activate", is_flag=True, help="Without --all-versions: activate the new version once ready.")
@click.option("--resume", is_flag=True, help="Finish NAME's unfinished takedowns (after a store failure).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_forget(rt, name, keys_file, all_versions, reason, activate, resume, as_json) -> None:
    """Take items out of NAME by key. By default: a new version of NAME built from the active one without them (a
    delta: nothing is re-encoded), to activate as usual; the versions already built keep them. --all-versions:
    out of every version, in place."""
    from .. import takedown

    if resume:
        out = takedown.resume(rt, name)
    else:
        if keys_file is None:
            raise click.UsageError("give --keys FILE (or --resume)")
        keys = takedown.read_keys(keys_file)
        if all_versions:
            out = [takedown.forget_everywhere(rt, name, keys, reason)]
        else:
            from ..build import start_build

            v = start_build(rt, name, None, parent="active", remove_keys=keys, reason=reason, activate=activate)
            click.echo(f"{name} v{v.version}: v{v.parent_version} − {len(keys)} keys", err=True)
            run_build(rt, name, v, True, None)
            out = [t for t in takedown.takedowns(rt, name) if t["new_version"] == v.version]
            if not activate:
                click.echo(f"activate it with `reco memory activate {name} {v.version}`; v{v.parent_version} and "
                           f"older versions still hold the keys (`--all-versions` removes them there)")
    if as_json:
        echo_json(out)
        return
    for t in out:
        where = f"-> v{t['new_version']}"
        if t["scope"] != "version":
            where = (", ".join(f"v{n}: {m}" for n, m in t["versions"].items())
                     + f"; {t['caches_dropped']} cache(s) dropped")
        click.echo(f"takedown #{t['id']} ({t['scope']}) {t['status']}: {t['keys']} keys, {where}")


@memory.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_list(rt, as_json) -> None:
    """Every memory with its versions."""
    from ..memory import list_memories

    out = list_memories(rt)
    if as_json:
        echo_json(out)
        return
    rows = [[m["name"], v["version"], v["status"] + (" *" if v["active"] else ""), v["items_stored"],
             v["items_skipped"], f"{v['shards_done']}/{v['shards_total']}", v["backbone"], v["created_at"][:19]]
            for m in out for v in m["versions"]]
    table(rows, ["NAME", "VERSION", "STATUS", "ITEMS", "SKIPPED", "SHARDS", "BACKBONE", "CREATED"])
    if rows:
        click.echo("(* = active)")


@memory.command("show")
@click.argument("name")
@click.option("--version", "version", type=int, default=None, help="Default: the active version, else the newest.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_show(rt, name, version, as_json) -> None:
    """Status, counts, skip reasons and per-shard progress of one version."""
    from ..leases import lease_info
    from ..memory import get_memory, get_version, lineage_line, summary

    with rt.db.session() as s:
        mem = get_memory(s, name)
        v = get_version(s, name, version)
        d = summary(s, v, mem.active_version_id)
        d["name"] = name
        d["shards"] = [{"id": sh.id, "index": sh.index, "name": sh.spec.get("name"), "status": sh.status,
                        **lease_info(sh, rt.settings.lease_s),
                        "items_stored": sh.items_stored, "items_skipped": sh.items_skipped,
                        "skip_reasons": sh.skip_reasons, "attempts": sh.attempts, "error": sh.error}
                       for sh in v.shards]
    from ..takedown import takedowns

    d["lineage"] = lineage_line(d)
    d["takedowns"] = takedowns(rt, name)
    d["storage"] = _applied_storage(rt, d)
    d["search_runs"] = None
    if d["status"] in ("ready", "retired"):  # where a model on this machine would search it (settings, device, size)
        from ..device_search import where

        d["search_runs"] = where(rt.settings, None, rt.store, d["collection"], d["items_stored"], d["dim"])
    if as_json:
        echo_json(d)
        return
    for k in ("name", "version", "status", "active", "lineage", "backbone", "dim", "source", "format", "collection",
              "items_stored", "items_skipped", "items_forgotten", "created_at", "ready_at", "activated_at", "error",
              "search_runs"):
        if d.get(k) is not None and (k != "items_forgotten" or d[k]):
            click.echo(f"{k:14} {d[k]}")
    applied = d["storage"] or {"quantization": "-", "on_disk": d["on_disk"]}
    click.echo(f"{'storage':14} {applied['quantization']} vectors (asked: {d['quantization']}), originals "
               f"{'on disk (memory-mapped)' if applied['on_disk'] else 'in RAM'}")
    for r, n in sorted(d["skip_reasons"].items()):
        click.echo(f"  skipped {r}: {n}")
    table([[sh["index"], sh["name"], sh["state"], sh["worker"] or "", sh["items_stored"], sh["items_skipped"],
            sh["attempts"], sh["error"] or (f"lease expired {sh['stale_since'][:19]}" if sh["stale_since"] else "")]
           for sh in d["shards"]],
          ["SHARD", "NAME", "STATE", "WORKER", "STORED", "SKIPPED", "ATTEMPTS", "ERROR"])
    if d["takedowns"]:
        click.echo(f"takedowns of {name}:")
        table([[t["id"], t["created_at"][:19], t["scope"], t["status"], t["keys"],
                f"v{t['new_version']}" if t["new_version"] else
                " ".join(f"v{n}:{m}" for n, m in t["versions"].items()), t["reason"] or t["error"] or ""]
               for t in d["takedowns"]], ["ID", "AT", "SCOPE", "STATUS", "KEYS", "REMOVED (VERSION:POINTS)", "REASON"])


def _applied_storage(rt, d: dict) -> dict | None:
    """What the store applied to a sealed version (quantization is decided at the seal for `auto`)."""
    if d["status"] not in ("ready", "retired"):
        return None
    try:
        return rt.store.storage(d["collection"])
    except RecoError:
        return None


@memory.command("activate")
@click.argument("name")
@click.argument("version", type=int)
@click.pass_obj
def memory_activate(rt, name, version) -> None:
    """Make VERSION the one queries read (atomic: a query sees the old or the new version, never a mix)."""
    from ..memory import activate

    activate(rt, name, version)
    click.echo(f"{name} v{version} is active")


@memory.command("verify")
@click.argument("name")
@click.option("--version", "version", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_verify(rt, name, version, as_json) -> None:
    """Reconcile the metadata with the vector store; exit 1 on any mismatch."""
    from dataclasses import asdict

    from ..memory import verify

    r = verify(rt, name, version)
    if as_json:
        echo_json({**asdict(r), "ok": r.ok})
    else:
        click.echo(f"{name} v{r.version} ({r.status}): metadata {r.shard_sum}, store {r.store_count}, "
                   f"shards {r.shards_done}/{r.shards_total} done")
        for p in r.problems:
            click.echo(f"  MISMATCH: {p}")
        click.echo("OK" if r.ok else "FAILED")
    if not r.ok:
        sys.exit(1)


@memory.command("resume")
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the version is ready.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.pass_obj
def memory_resume(rt, name, version, wait, timeout) -> None:
    """Put a building version's lost shards (pending with no message, stale lease) back to work now, or retry a
    failed version's unfinished shards. Workers do the same on their own once per lease period."""
    from ..build import resume, wait_for

    r = resume(rt, name, version)
    number = r["version"]
    if r.get("ran_in_process"):
        status = version_status(rt, r["version_id"])
    else:
        click.echo(f"{name} v{number}: {r['requeued']} shard(s) re-queued, {r['failed']} failed", err=True)
        warn_without_workers(rt, "ingest")
        if not wait:
            return
        status = wait_for(rt, r["version_id"], timeout=timeout, sweep_every=rt.settings.lease_s)
    report_build(rt, name, number, status)


@memory.command("finalize")
@click.argument("name")
@click.argument("version", type=int)
@click.pass_obj
def memory_finalize(rt, name, version) -> None:
    """Seal a version left `finalizing` by a finaliser that died (every shard done); then it is ready."""
    from ..memory import finalize

    status = finalize(rt, name, version)
    click.echo(f"{name} v{version} {status}")
    if status != "ready":
        sys.exit(1)


@memory.command("delete")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--force", is_flag=True, help="Also delete the active version (the memory is then inactive).")
@click.pass_obj
def memory_delete(rt, name, version, force) -> None:
    """Delete one version: its metadata and its vector collection."""
    from ..memory import delete

    delete(rt, name, version, force=force)
    click.echo(f"deleted {name} v{version}")


@memory.command("query")
@click.argument("name")
@click.option("--text", "text", default=None, help="Find memory items whose caption is near this text.")
@click.option("--image", "image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Find memory items whose image is near this image.")
@click.option("-k", "k", default=10, show_default=True)
@click.option("--version", "version", type=int, default=None, help="Default: the active version.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def memory_query(rt, name, text, image, k, version, as_json) -> None:
    """Nearest memory items to a text or an image (uni-modal search, as RECO retrieves): a sanity check."""
    from ..query import query_memory

    hits = query_memory(rt, name, text=text, image=image, k=k, version=version)
    if as_json:
        echo_json([{"rank": i + 1, "score": h.score, "key": h.payload.get("key"), "caption": h.payload.get("caption"),
                    "id": h.id} for i, h in enumerate(hits)])
        return
    table([[i + 1, f"{h.score:.4f}", h.payload.get("key"), h.payload.get("caption")] for i, h in enumerate(hits)],
          ["RANK", "SCORE", "KEY", "CAPTION"])


memory.add_command(memory_export)
memory.add_command(memory_import)
